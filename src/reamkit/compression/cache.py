"""The hidden states between two decoder layers, one tensor per calibration batch.

Kept in memory while they fit a budget, otherwise spilled to files in the run's work folder and memory-mapped
back one batch at a time (1024 x 2048 tokens x 2048 hidden in fp32 is ~17 GB; a layer never needs more than
one batch of them at once).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class ActivationCache:
    def __init__(self, folder: Path, budget_bytes: int):
        self.folder = Path(folder)
        self.budget = int(budget_bytes)
        self._mem: list[torch.Tensor | None] = []
        self._bytes = 0

    def append(self, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self._bytes + n <= self.budget:
            self._mem.append(t)
            self._bytes += n
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        save_file({"h": t.contiguous().cpu()}, str(self._path(len(self._mem))))
        self._mem.append(None)

    def __len__(self) -> int:
        return len(self._mem)

    def __getitem__(self, i: int) -> torch.Tensor:
        t = self._mem[i]
        return t if t is not None else load_file(str(self._path(i)))["h"]

    def _path(self, i: int) -> Path:
        return self.folder / f"batch-{i:06d}.safetensors"

    def close(self) -> None:
        self._mem.clear()
        self._bytes = 0
        shutil.rmtree(self.folder, ignore_errors=True)
