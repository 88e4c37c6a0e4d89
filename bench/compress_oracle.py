#!/usr/bin/env python3
"""The best any per-layer choice of compression plan could do: every hybrid of the candidates' layers, measured.

    python bench/compress_oracle.py [--methods reap,ream:2,ream:4,ream:8,ream:16] [--samples 128 --seq-len 512]
        [--calib code=0.7,math=0.3] [--ratio 0.25] [--windows 16 --window-len 128] [--cache DIR] [--compress-only]

Compresses the trained demo model once per candidate method (the specs of ``bench/compress_quality.py``) and
once with ``auto``, keeping the compressed checkpoints in a cache folder (``<tempdir>/reamkit-oracle`` by default,
reused by a rerun with the same settings). Then it evaluates every hybrid model whose decoder layer L is taken
from candidate ``choice[L]`` (5^4 = 625 for the demo model's 4 MoE layers; every candidate keeps the same number
of experts, so the layers fit together; layers that are identical in two candidates are evaluated once) with
transformers, reusing each prefix of layers' hidden states, and measures the mean KL divergence from the
uncompressed model on the held-out code and math windows of ``compress_quality.py``, per sequence.

It prints each single method's KL (mean ± standard error over held-out sequences), the oracle's best hybrid for
code, for math and for their mean -- which candidate each layer takes -- with its paired difference from REAP and
from the best single REAM setting (± the standard error of the paired difference), and ``auto``'s own choice per
layer (from its ``compression/report.json``), its KL and the rank of that choice among all hybrids.

The hybrids are an approximation of what a per-layer choice inside the sequential pass would give: candidate
layer L was compressed from the hidden states its own method's earlier layers produced (REAP's from the
uncompressed model's), not from the hybrid's. ``auto`` itself is sequential, so its model equals none of the
hybrids exactly; the table shows both. Timings are printed per phase.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compress_quality import heldout_ids, mean_se, method_options  # noqa: E402

METHODS = "reap,ream:2,ream:4,ream:8,ream:16"


def compress_all(src: Path, cache: Path, specs: list[str], a: argparse.Namespace) -> dict[str, Path]:
    """Each spec's compressed checkpoint in ``cache`` (made once; a rerun with the same settings reuses it)."""
    from reamkit.compression import CompressOptions, compress
    from reamkit.errors import OutputExistsError

    out = {}
    for spec in specs:
        method, mopts = method_options(spec)
        folder = cache / spec.replace(":", "-")
        opts = CompressOptions(method=method, ratio=a.ratio, samples=a.samples, seq_len=a.seq_len, calib=a.calib,
                               batch_size=8, method_options=mopts)
        t = time.time()
        try:
            res = compress(src, folder, opts)
        except OutputExistsError:                     # made by another reamkit version: make it again
            shutil.rmtree(folder)
            res = compress(src, folder, opts)
        print(f"compress {spec}: {'cached' if res.skipped else f'{time.time() - t:.0f} s'}", flush=True)
        out[spec] = folder
    return out


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def same_layer(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def stats(kl: torch.Tensor, windows: int) -> dict:
    """Per-sequence KL [2W] (code windows, then math) -> {"code": [W], "math": [W]} as lists."""
    return {"code": kl[:windows].tolist(), "math": kl[windows:].tolist()}


@torch.no_grad()
def evaluate(src: Path, folders: dict[str, Path], specs: list[str], a: argparse.Namespace) -> dict:
    """Per-sequence KL of every hybrid (a tuple of spec indices per layer) and of ``auto``'s own model."""
    data = torch.cat([heldout_ids(src, k, a.windows, a.window_len) for k in ("code", "math")])
    base = load(src)
    captured: dict[int, tuple] = {}
    hooks = [lay.register_forward_pre_hook(lambda m, args, kw, i=i: captured.setdefault(i, (args, kw)),
                                           with_kwargs=True) for i, lay in enumerate(base.model.layers)]
    ref = torch.log_softmax(base(input_ids=data, use_cache=False).logits.float(), -1)
    for h in hooks:
        h.remove()
    n = len(base.model.layers)

    def kl(hidden: torch.Tensor, head=lambda h: base.lm_head(base.model.norm(h))) -> torch.Tensor:
        out = []
        for s in range(0, len(hidden), 8):
            got = torch.log_softmax(head(hidden[s:s + 8]).float(), -1)
            r = ref[s:s + 8]
            out.append((r.exp() * (r - got)).sum(-1).double().mean(-1))
        return torch.cat(out)

    def run(layer: torch.nn.Module, i: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kw = captured[i]
        out = layer(hidden, *args[1:], **kw)
        return out[0] if isinstance(out, tuple) else out

    models = {spec: load(folders[spec]) for spec in folders}
    distinct: list[list[torch.nn.Module]] = []       # per layer, the distinct candidate layers
    index: list[list[int]] = []                      # per layer, spec -> its distinct layer
    for i in range(n):
        distinct.append([])
        index.append([])
        for spec in specs:
            lay = models[spec].model.layers[i]
            j = next((j for j, d in enumerate(distinct[i]) if same_layer(d, lay)), None)
            if j is None:
                distinct[i].append(lay)
                j = len(distinct[i]) - 1
            index[i].append(j)
    found: dict[tuple, torch.Tensor] = {}

    def walk(i: int, hidden: torch.Tensor, prefix: tuple) -> None:
        if i == n:
            found[prefix] = kl(hidden)
            return
        for j, lay in enumerate(distinct[i]):
            walk(i + 1, run(lay, i, hidden), prefix + (j,))

    emb = captured[0][0][0]
    walk(0, emb, ())
    hidden = emb
    for i, lay in enumerate(models["auto"].model.layers if "auto" in models else []):
        hidden = run(lay, i, hidden)
    # the walk's single-method hybrids must equal the compressed models run whole
    check = max(float((found[tuple(index[i][k] for i in range(n))]
                        - kl(data, lambda x, m=models[spec]: m(input_ids=x, use_cache=False).logits)).abs().max())
                for k, spec in enumerate(specs))
    hybrids = {c: found[tuple(index[i][c[i]] for i in range(n))]
               for c in itertools.product(range(len(specs)), repeat=n)}
    return {"hybrids": hybrids, "auto": kl(hidden) if "auto" in models else None,
            "distinct": [len(d) for d in distinct], "check": check}


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of b - a over the same sequences (positive: a is better)."""
    return mean_se([y - x for x, y in zip(a, b)])


def fmt(v: list[float]) -> str:
    mu, se = mean_se(v)
    return f"{mu:.4f} ± {se:.4f}"


def oracle(src: Path, folders: dict[str, Path], specs: list[str], a: argparse.Namespace) -> None:
    t = time.time()
    res = evaluate(src, folders, specs, a)
    n = len(res["distinct"])
    rows = {c: stats(v, a.windows) for c, v in res["hybrids"].items()}
    print(f"evaluation: {time.time() - t:.0f} s ({len(rows)} hybrids, distinct layers per layer "
          f"{res['distinct']}; {a.windows} x {a.window_len} held-out tokens per domain; layer-by-layer vs whole "
          f"model KL differ by at most {res['check']:.1e})\n")
    mean = {c: [(x + y) / 2 for x, y in zip(r["code"], r["math"])] for c, r in rows.items()}
    single = {spec: (k,) * n for k, spec in enumerate(specs)}
    reap = rows[single["reap"]] if "reap" in single else None
    ream = [s for s in specs if s.startswith("ream")]
    best_ream = {dom: min(ream, key=lambda s: mean_se(rows[single[s]][dom])[0]) for dom in ("code", "math")}
    name = lambda c: "/".join(specs[k] for k in c)  # noqa: E731
    print("| model | KL code | KL math | vs reap (code) | (math) | vs best ream (code) | (math) |")
    print("|---|---|---|---|---|---|---|")

    def line(label: str, r: dict) -> None:
        cells = [fmt(r["code"]), fmt(r["math"])]
        for other in ([reap] if reap else []) + [{d: rows[single[best_ream[d]]][d] for d in ("code", "math")}]:
            for dom in ("code", "math"):
                mu, se = paired(other[dom], r[dom])
                cells.append(f"{mu:+.4f} ± {se:.4f}")
        print(f"| {label} | " + " | ".join(cells) + " |")

    for spec in specs:
        line(spec, rows[single[spec]])
    for goal, key in (("code", lambda c: mean_se(rows[c]["code"])[0]), ("math", lambda c: mean_se(rows[c]["math"])[0]),
                      ("mean", lambda c: mean_se(mean[c])[0])):
        best = min(rows, key=key)
        line(f"oracle for {goal}: {name(best)}", rows[best])
    choices = [lay.get("auto", {}).get("choice") for lay in
               json.loads((folders["auto"] / "compression" / "report.json").read_text())["layers"]] \
        if "auto" in folders else []
    if choices:
        line(f"auto (own model), chose {'/'.join(map(str, choices))}", stats(res["auto"], a.windows))
    if choices and all(c in specs for c in choices):
        c = tuple(specs.index(x) for x in choices)
        line("hybrid of auto's choices", rows[c])
        ranks = {g: 1 + sum(v < f(c) for v in map(f, rows)) for g, f in
                 (("code", lambda c: mean_se(rows[c]["code"])[0]), ("math", lambda c: mean_se(rows[c]["math"])[0]),
                  ("mean", lambda c: mean_se(mean[c])[0]))}
        print(f"\nauto's choice ranks {ranks['code']} (code), {ranks['math']} (math), {ranks['mean']} (mean) "
              f"of {len(rows)} hybrids")
    print(f"best single REAM: {best_ream['code']} (code), {best_ream['math']} (math); differences are paired over "
          "the same held-out sequences, positive when the row is worse")
    wins = [c for c in rows if all(
        (lambda mu_se: mu_se[0] + mu_se[1] < 0)(paired(other[dom], rows[c][dom]))
        for dom in ("code", "math") for other in ([reap] if reap else []) + [rows[single[best_ream[dom]]]])]
    print(f"hybrids better than REAP and the best REAM by more than one SE on both code and math: {len(wins)}"
          + (f" (best by mean: {name(min(wins, key=lambda c: mean_se(mean[c])[0]))})" if wins else ""))


def main() -> None:
    from reamkit.zoo import DEMO_MODEL

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=METHODS, help="the candidates each layer may come from")
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    ap.add_argument("--calib", default="code=0.7,math=0.3")
    ap.add_argument("--ratio", type=float, default=0.25, help="fraction of experts removed")
    ap.add_argument("--windows", type=int, default=16, help="held-out sequences per domain")
    ap.add_argument("--window-len", type=int, default=128, help="tokens per held-out sequence")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reamkit-oracle")
    ap.add_argument("--compress-only", action="store_true", help="make the compressed checkpoints and stop")
    ap.add_argument("--auto", action=argparse.BooleanOptionalAction, default=True,
                    help="also compress with auto and place its choice among the hybrids (default: yes)")
    a = ap.parse_args()
    t0 = time.time()
    setup = {k: getattr(a, k) for k in ("samples", "seq_len", "calib", "ratio")}
    cache = a.cache / hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:12]
    cache.mkdir(parents=True, exist_ok=True)
    specs = a.methods.split(",")
    folders = compress_all(DEMO_MODEL, cache, specs + ["auto"] * a.auto, a)
    print(f"compression: {time.time() - t0:.0f} s (checkpoints in {cache})", flush=True)
    if a.compress_only:
        return
    oracle(DEMO_MODEL, folders, specs, a)
    print(f"total: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
