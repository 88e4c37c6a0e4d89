#!/usr/bin/env python3
"""How far each compression method moves a model: KL divergence from the uncompressed model on held-out code
and held-out math (the corpora's evaluation part, never calibration text), every method at 25 % fewer experts.

    python bench/compress_quality.py [--models qwen3_next,qwen3_moe,mixtral,demo] [--methods ream,reap] [--samples 32]

Prints one table per model: mean KL (nats/token, ± its standard error over the held-out windows) and top-1
agreement with the uncompressed model. On the
random-weight zoo models the numbers say little about real models (unrelated experts average badly); the
trained demo model is the meaningful row.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

METHODS = ["ream", "reap", "frequency", "hc-smoe", "m-smoe"]


def heldout_ids(model_dir: Path, kind: str, windows: int, seq_len: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from reamkit.calibration import corpus

    docs = corpus.heldout_part(corpus.code_documents() if kind == "code" else corpus.math_documents(20_000))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids: list[int] = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id or 0]
        if len(ids) >= windows * seq_len:
            break
    return torch.tensor(ids[: windows * seq_len]).view(windows, seq_len)


def logprobs(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from reamkit.models import open_model
    from reamkit.runtime import LayerwiseModel

    lw = LayerwiseModel(open_model(model_dir))
    return torch.cat([torch.log_softmax(lw.forward(ids[i:i + 4]).double(), -1) for i in range(0, len(ids), 4)])


def main() -> None:
    from reamkit.compression import CompressOptions, compress
    from reamkit.zoo import DEMO_MODEL, build_cached

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen3_next,qwen3_moe,mixtral,demo")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences of 256 tokens")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows of 256 tokens per domain")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reamkit-quality-"))
    try:
        for name in a.models.split(","):
            src = DEMO_MODEL if name == "demo" else build_cached(name)
            data = {k: heldout_ids(src, k, a.windows, 256) for k in ("code", "math")}
            ref = {k: logprobs(src, v) for k, v in data.items()}
            print(f"\n{name}: KL from the uncompressed model at 25% fewer experts "
                  f"({a.windows} x 256 held-out tokens per domain)")
            print(f"| method | KL code | KL math | top-1 code | top-1 math |\n|---|---|---|---|---|")
            for method in a.methods.split(","):
                out = work / f"{name}-{method}"
                compress(src, out, CompressOptions(method=method, ratio=0.25, samples=a.samples, seq_len=256,
                                                   batch_size=8))
                row = []
                agree = []
                for k, v in data.items():
                    got = logprobs(out, v)
                    kl = (ref[k].exp() * (ref[k] - got)).sum(-1).mean(-1)      # per held-out window
                    row.append(f"{kl.mean().item():.4f} ± {kl.std().item() / len(kl) ** 0.5:.4f}")
                    agree.append((ref[k].argmax(-1) == got.argmax(-1)).double().mean().item())
                print(f"| {method} | {row[0]} | {row[1]} | {agree[0]:.1%} | {agree[1]:.1%} |", flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
