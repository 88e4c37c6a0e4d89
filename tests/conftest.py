"""Shared fixtures: tiny zoo models (built once, cached) and reference inputs."""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from reamkit.zoo import FAMILIES, build_cached  # noqa: E402

FAMILY_NAMES = list(FAMILIES)
_FIGURES: list[str] = []


@pytest.fixture
def figure():
    """Report a measured figure; all of them are printed in the run's summary (not only with -s)."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("reamkit figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session", params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def zoo_path(family) -> Path:
    """The cached zoo model of ``family``; read-only for tests (copy it to change it)."""
    return build_cached(family)


@pytest.fixture
def zoo_copy(zoo_path, tmp_path) -> Path:
    """A private, writable copy of the zoo model."""
    dst = tmp_path / "model"
    shutil.copytree(zoo_path, dst)
    return dst


def constraints_pin(key: str) -> str:
    """A pin read straight from constraints.txt (``name==version`` or ``# pin: key value``), independently of
    the code under test."""
    for line in (Path(__file__).resolve().parents[1] / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{key}=="):
            return line.split("==", 1)[1].split()[0]
        if line.startswith(f"# pin: {key} "):
            return line.split()[3]
    raise KeyError(key)


def reference_ids(path: Path, n: int = 200) -> torch.Tensor:
    """``n`` token ids of real Python source (not from the tokenizer's training files), shape [1, n]."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    text = inspect.getsource(inspect) + inspect.getsource(shutil)
    ids = tok(text)["input_ids"][:n]
    assert len(ids) == n
    return torch.tensor([ids])


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    # Weights memory-mapped from safetensors sit at whatever alignment their file offset gives, and CPU
    # GEMM kernels may sum in a different order for differently aligned inputs (seen: 2e-5 apart for
    # bit-identical weights). Fresh allocations make "same weights -> same logits" exact.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        return model(ids).logits[0]


def masked_router(layer, adapter, keep: list[int]):
    """Make ``layer``'s router give -inf logits to every expert not in ``keep`` (the reference for pruning:
    softmax over the kept experts only, then the layer's own top-k, renormalisation and expert kernels)."""
    hf = importlib.import_module(adapter.hf_module)
    gate = layer.mlp.gate
    real_forward, real_linear = gate.forward, hf.F.linear
    dropped = torch.ones(gate.weight.shape[0], dtype=torch.bool)
    dropped[keep] = False

    def linear(x, w, *args):
        out = real_linear(x, w, *args)
        return out.masked_fill(dropped, float("-inf")) if w is gate.weight else out

    def forward(hidden):
        hf.F.linear = linear
        try:
            return real_forward(hidden)
        finally:
            hf.F.linear = real_linear

    gate.forward = forward
    return layer
