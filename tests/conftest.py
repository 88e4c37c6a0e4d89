"""Shared fixtures: tiny zoo models (built once, cached) and reference inputs."""

from __future__ import annotations

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
