"""A tiny quantized ladder of the demo model, built once per test session and shared by the speed and report
tests (the demo model's F16 GGUF and two quantized types)."""

from __future__ import annotations

from pathlib import Path

from reamkit.gguf import convert_to_gguf
from reamkit.llamacpp.tools import run_tool
from reamkit.zoo import DEMO_MODEL

TYPES = ("Q8_0", "Q2_K")


def tiny_ladder(folder: Path, types: tuple[str, ...] = TYPES) -> dict[str, Path]:
    """``{"F16": ..., "Q8_0": ..., "Q2_K": ...}`` of the demo model in ``folder`` (reused when already there)."""
    f16, _ = convert_to_gguf(DEMO_MODEL, folder / "demo.F16.gguf", dtype="f16")
    out = {"F16": f16}
    for t in types:
        q = folder / f"demo.{t}.gguf"
        if not q.is_file():
            run_tool("llama-quantize", [f16, q, t, "2"])
        out[t] = q
    return out
