"""Shared pieces of the quantization tests: the tiny models' reference GGUFs, converted once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from reamkit.gguf import convert_to_gguf


def reference_gguf(family: str, zoo_path: Path, base: Path) -> Path:
    """The F16 GGUF of a zoo model; converted on first use, then found current and reused."""
    out = base / "quant-references" / f"{family}.F16.gguf"
    path, _ = convert_to_gguf(zoo_path, out, dtype="f16")
    return path


@pytest.fixture(scope="session")
def reference(family, zoo_path, tmp_path_factory) -> Path:
    return reference_gguf(family, zoo_path, tmp_path_factory.getbasetemp())


def tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def metadata(path: Path) -> dict:
    from gguf import GGUFReader

    return {f.name: f.contents() for f in GGUFReader(str(path)).fields.values()
            if not f.name.startswith("tokenizer.")}


def eval_logits(path: Path, text: bytes = b"def add(a, b):\n    return a + b\n"):
    """Load a GGUF in the pinned llama.cpp and return its logits over ``text`` ([n_tokens, n_vocab]).

    Weight repacking ("extra buffer types") follows reamkit's probe (:func:`reamkit.llamacpp.repack.load_llama`): on
    CPUs that advertise AMX under a hypervisor that does not enable it, the AMX kernels fault; repacking changes
    speed, not results.
    """
    import numpy as np

    from reamkit.llamacpp.repack import load_llama

    llm = load_llama(path, n_ctx=64, n_threads=2, logits_all=True)
    llm.eval(llm.tokenize(text))
    scores = np.asarray(llm.scores[: llm.n_tokens])
    llm.close()
    return scores
