"""The demo run: the built-in trained demo model through the whole pipeline, sized to finish in minutes on
2 CPU cores (small calibration and evaluation sets, a short HumanEval slice, quick speed runs)."""

from __future__ import annotations

from pathlib import Path

from ..defaults import EXECUTOR

DESCRIPTION = ("This run used reamkit's built-in **trained demo model** (demo-coder: 18.6M parameters, 4 layers, "
               "16 experts top-2, trained on CPU on a small code and math corpus). It is a toy: its figures show how "
               "the variants compare with one another, not how a real coding model performs.")


def demo_config(model_dir: Path, *, executor: str = EXECUTOR) -> dict:
    return {
        "model": str(Path(model_dir).resolve()),
        "name": "demo-coder",
        "description": DESCRIPTION,
        "compress": {"samples": 32, "seq_len": 256},      # methods and ratio: a run's defaults
        "quantize": {"imatrix_chunks": 16, "imatrix_ctx": 256},
        "evaluate": {"tokens": 1024, "ctx": 256, "humaneval_limit": 10, "humaneval_max_tokens": 96,
                     "speed_prompt": 128, "speed_gen": 32, "speed_repetitions": 2},
        "executor": {"kind": executor},
    }
