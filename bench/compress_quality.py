#!/usr/bin/env python3
"""How far each compression method moves a model: KL divergence from the uncompressed model on held-out code
and held-out math (the corpora's evaluation part, never calibration text), and top-1 agreement.

    python bench/compress_quality.py [--models demo,qwen3_next,qwen3_moe,mixtral] [--samples 128 --seq-len 512]
        [--methods auto,reap,ream:2,ream:4,ream:8,ream:16,ream-ref:2,frequency,hc-smoe,m-smoe]
        [--windows 16 --window-len 128] [--ratio 0.25] [--save results.json]

A method is a name (``auto``, ``reap``, ``frequency``, ``hc-smoe``, ``m-smoe``, ``ream`` with its defaults) or
``ream:C`` / ``ream-ref:C`` (REAM's paper / reference variant with group size C). Every figure is a mean over
held-out sequences with its standard error (over sequences); the last columns compare each method with the
first one listed on the same sequences: the paired difference of KL and its standard error (positive: the
first method is better). ``--save`` keeps every method's per-sequence KL, so a rerun with more methods only
compresses the new ones. On the random-weight zoo models the numbers say little about real models; the
trained demo model is the meaningful row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

METHODS = "auto,reap,ream:2,ream:4,ream:8,ream:16,ream-ref:2,ream-ref:16,frequency,hc-smoe,m-smoe"


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
    from reamkit.compression.layerwise import LayerwiseModel
    from reamkit.models import open_model

    lw = LayerwiseModel(open_model(model_dir))
    return torch.cat([torch.log_softmax(lw.forward(ids[i:i + 4]).double(), -1) for i in range(0, len(ids), 4)])


def method_options(spec: str) -> tuple[str, dict]:
    if spec.startswith(("ream:", "ream-ref:")):
        name, size = spec.split(":")
        return "ream", {"group_size": size if size == "auto" else int(size),
                        "variant": "reference" if name == "ream-ref" else "paper"}
    return spec, {}


def per_sequence(ref: torch.Tensor, got: torch.Tensor) -> tuple[list[float], list[float]]:
    """Mean KL(ref || got) and top-1 agreement of each sequence [S, T, V] -> ([S], [S])."""
    kl = (ref.exp() * (ref - got)).sum(-1).mean(-1)
    agree = (ref.argmax(-1) == got.argmax(-1)).double().mean(-1)
    return kl.tolist(), agree.tolist()


def mean_se(v: list[float]) -> tuple[float, float]:
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.mean()), float(t.std() / len(t) ** 0.5) if len(t) > 1 else float("nan")


def table(results: dict, order: list[str]) -> str:
    first = order[0]
    lines = [f"| method | KL code | KL math | top-1 code | top-1 math | {first} better by (code) | (math) | s |",
             "|---|---|---|---|---|---|---|---|"]
    for m in order:
        r = results[m]
        cells = []
        for k in ("kl", "top1"):
            for dom in ("code", "math"):
                mu, se = mean_se(r[dom][k])
                cells.append(f"{mu:.4f} ± {se:.4f}" if k == "kl" else f"{mu:.1%} ± {se:.1%}")
        for dom in ("code", "math"):
            diff = [b - a for a, b in zip(results[first][dom]["kl"], r[dom]["kl"])]
            mu, se = mean_se(diff)
            cells.append("-" if m == first else f"{mu:+.4f} ± {se:.4f}")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {r.get('seconds', 0):.0f} |")
    return "\n".join(lines)


def main() -> None:
    from reamkit import defaults
    from reamkit.compression import CompressOptions, compress
    from reamkit.zoo import DEMO_MODEL, build_cached

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="demo,qwen3_next,qwen3_moe,mixtral")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--samples", type=int, default=defaults.CALIB_SAMPLES, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=defaults.CALIB_SEQ_LEN, help="tokens per calibration sequence")
    ap.add_argument("--calib", default=defaults.CALIB_MIX)
    ap.add_argument("--ratio", type=float, default=defaults.RUN_RATIO, help="fraction of experts removed")
    ap.add_argument("--windows", type=int, default=16, help="held-out sequences per domain")
    ap.add_argument("--window-len", type=int, default=128, help="tokens per held-out sequence")
    ap.add_argument("--save", type=Path, help="JSON of per-sequence results, reused and extended by a rerun")
    a = ap.parse_args()
    saved = json.loads(a.save.read_text()) if a.save and a.save.is_file() else {}
    setup = {"samples": a.samples, "seq_len": a.seq_len, "calib": a.calib, "ratio": a.ratio, "windows": a.windows,
             "window_len": a.window_len}
    work = Path(tempfile.mkdtemp(prefix="reamkit-quality-"))
    order = a.methods.split(",")
    try:
        for name in a.models.split(","):
            key = json.dumps({"model": name, **setup}, sort_keys=True)
            results = saved.setdefault(key, {})
            src = DEMO_MODEL if name == "demo" else build_cached(name)
            data = {k: heldout_ids(src, k, a.windows, a.window_len) for k in ("code", "math")}
            ref = {k: logprobs(src, v) for k, v in data.items()}
            for spec in order:
                if spec in results:
                    continue
                method, mopts = method_options(spec)
                out = work / f"{name}-{spec.replace(':', '-')}"
                t0 = time.time()
                res = compress(src, out, CompressOptions(method=method, ratio=a.ratio, samples=a.samples,
                                                         seq_len=a.seq_len, calib=a.calib, batch_size=8,
                                                         method_options=mopts))
                row: dict = {"seconds": time.time() - t0}
                for dom, ids in data.items():
                    kl, top1 = per_sequence(ref[dom], logprobs(out, ids))
                    row[dom] = {"kl": kl, "top1": top1}
                if method == "auto" or mopts.get("group_size") == "auto":
                    row["choices"] = [lay.get("auto", {}).get("choice") for lay in res.report["layers"]]
                results[spec] = row
                print(f"{name} {spec}: KL code {mean_se(row['code']['kl'])[0]:.4f}, math "
                      f"{mean_se(row['math']['kl'])[0]:.4f} ({row['seconds']:.0f} s)"
                      + (f", per-layer choices {row['choices']}" if "choices" in row else ""), flush=True)
                if a.save:
                    a.save.write_text(json.dumps(saved))
                shutil.rmtree(out)
            print(f"\n{name}: {int(a.ratio * 100)}% fewer experts; calibration {a.calib}, {a.samples} x "
                  f"{a.seq_len} tokens; held out {a.windows} x {a.window_len} tokens per domain; "
                  "mean ± standard error over held-out sequences")
            print(table(results, [m for m in order if m in results]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
