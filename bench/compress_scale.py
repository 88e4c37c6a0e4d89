"""The compression pass across calibration sizes, and what Qwen3-Coder-Next at 3072 x 512 tokens would take.

Used by ``bench/compress.py --tokens``. The checkpoint has Qwen3-Next's routing shape -- 512 routed experts,
top-10, a sigmoid-gated shared expert -- with hidden 128 and expert width 64 so that two cores finish; every
calibration size runs REAM (25 % fewer experts) in its own child process, with the hidden states spilled to
disk (memory budget 0), so that the peak RSS shows what the pass itself holds.

The extrapolation times the expert statistics -- every expert's gate, up and down projections on its routed
tokens, and the gate and up projections on every token of the experts REAM's grouping reads (the dropped ones
and the centroids that take them) -- at Qwen3-Coder-Next's own expert shape (hidden 2048, width 512) on this
machine, per token and expert, and multiplies out; GPU figures rest on stated throughput assumptions only.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(hidden_size=128, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=64,
             shared_expert_intermediate_size=128, intermediate_size=128, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64, linear_num_key_heads=1, linear_key_head_dim=64,
             linear_num_value_heads=2, linear_value_head_dim=64)
BIG = dict(layers=48, experts=512, top_k=10, hidden=2048, inter=512, tokens=3072 * 512, batch=8 * 512)


def build(layers: int) -> Path:
    """The generated checkpoint (built once, cached with the zoo models)."""
    from reamkit.zoo import build_cached

    types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
    return build_cached("qwen3_next", num_hidden_layers=layers, layer_types=types, **SHAPE)


def child(model: str, tokens: int, seq_len: int) -> None:
    import resource
    import shutil
    import tempfile

    import torch

    from reamkit.compression import CompressOptions, compress

    torch.set_num_threads(2)
    out = Path(tempfile.mkdtemp(prefix="reamkit-scale-")) / "out"
    t = time.time()
    rep = compress(model, out, CompressOptions(method="ream", ratio=0.25, samples=tokens // seq_len, seq_len=seq_len,
                                               batch_size=8, memory_budget_gb=0.0)).report
    seconds = time.time() - t
    shutil.rmtree(out.parent, ignore_errors=True)
    print(json.dumps({"seconds": seconds, "layers": [lay["seconds"] for lay in rep["layers"]],
                      "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def output_experts(experts: int, ratio: float = 0.25, group_size: int = 16) -> int:
    """How many experts REAM evaluates on every token at ``ratio`` fewer experts: the F dropped ones and the
    ceil(F / (C - 1)) centroids that take them (:func:`reamkit.compression.methods.ream.output_experts`)."""
    f = int(experts * ratio)
    return f + -(-f // (group_size - 1))


def expert_cost(experts: int, top_k: int, hidden: int, inter: int, tokens: int, reps: int = 2) -> tuple[float, float]:
    """Seconds per (token, routed expert) of :meth:`ExpertStats.observe` without the output sums (each expert's
    gate, up and down on its routed tokens), and seconds per (token, expert) of the output sums (an expert's gate
    and up on every token), on a random bf16 block computed in float32."""
    import torch

    from reamkit.compression.observe import ExpertStats, ObserveOptions
    from reamkit.models.base import Experts, Routing
    from reamkit.models.moe import MoEBlock

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    w = lambda *s: (torch.randn(*s, generator=g) * 0.02).bfloat16()  # noqa: E731
    block = MoEBlock(torch.randn(experts, hidden, generator=g), Experts(w(experts, inter, hidden),
                     w(experts, inter, hidden), w(experts, hidden, inter)), Routing(experts, top_k, True))
    x = torch.randn(tokens, hidden, generator=g)

    def seconds(outputs: bool) -> float:
        st = ExpertStats(experts, hidden, inter, reps + 1, ObserveOptions(activation_samples=0, outputs=outputs))
        st.observe(block, x)                               # warm-up
        t = time.time()
        for _ in range(reps):
            st.observe(block, x)
        return (time.time() - t) / reps

    routed = seconds(False)
    return routed / tokens / top_k, max(seconds(True) - routed, 0.0) / tokens / experts


def sweep(sizes: list[int], layers: int, seq_len: int, repeat: int = 1) -> None:
    """Each size in ``repeat`` child processes: the peak RSS is their median (heap fragmentation moves one run's
    peak by tens of MB), printed with its range; the times are the last run's."""
    src = build(layers)
    print(f"checkpoint: {src} ({layers} layers, 512 experts, top-10, shared expert, hidden 128, width 64)")
    head = "peak RSS" if repeat == 1 else f"peak RSS (median of {repeat}, range)"
    print(f"| tokens | {head} | seconds / layer | token-layers / s |\n|---|---|---|---|")
    peaks, rates = [], []
    for tokens in sizes:
        runs = []
        for _ in range(repeat):
            proc = subprocess.run([sys.executable, __file__, "child", str(src), str(tokens), str(seq_len)],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr[-2000:])
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        per = r["layers"]
        peaks.append(statistics.median(x["peak"] for x in runs))
        rates.append(tokens * layers / r["seconds"])
        spread_runs = "" if repeat == 1 else \
            f" ({min(x['peak'] for x in runs) / 1e9:.3f}-{max(x['peak'] for x in runs) / 1e9:.3f})"
        print(f"| {tokens} | {peaks[-1] / 1e9:.3f} GB{spread_runs} | mean {sum(per) / len(per):.1f}, max "
              f"{max(per):.1f} | {rates[-1]:.0f} |", flush=True)
    spread = (max(peaks) - min(peaks)) / min(peaks)
    print(f"peak RSS spread over a {max(sizes) // min(sizes)}x range of tokens: {spread:.1%} (target < 10%)")
    routed, dense = expert_cost(512, 10, SHAPE["hidden_size"], SHAPE["moe_intermediate_size"], 4096)
    n_out = output_experts(512)
    per_token = routed * 10 + dense * n_out
    share = per_token * max(sizes) / (max(sizes) / rates[-1])       # statistics / whole layer, per layer
    print(f"expert statistics at this shape: {routed * 1e9:.1f} ns per routed token-expert x 10 + {dense * 1e9:.1f} "
          f"ns per token-expert x {n_out} output experts = {share:.0%} of the layer time at {max(sizes)} tokens")
    extrapolate(share)


def extrapolate(share: float) -> None:
    from reamkit.compression.observe import ObserveOptions

    b = BIG
    routed, dense = expert_cost(64, 4, b["hidden"], b["inter"], 2048)    # ~128 routed tokens per expert, as at 4096 x 10/512
    n_out = output_experts(b["experts"])
    cpu_layer = b["tokens"] * (routed * b["top_k"] + dense * n_out)
    print(f"\nQwen3-Coder-Next, {b['tokens']} calibration tokens (3072 x 512), {b['layers']} layers of "
          f"{b['experts']} experts (hidden {b['hidden']}, width {b['inter']}), this machine's 2 threads, REAM to "
          f"{b['experts'] - b['experts'] // 4} experts (group size 16: {n_out} experts evaluated on every token):")
    print(f"  measured: {routed * 1e9:.0f} ns per routed token-expert, {dense * 1e9:.0f} ns per token-expert of the "
          f"output sums, at that shape (float32)")
    print(f"  CPU expert statistics: {b['tokens']} x ({b['top_k']} x {routed * 1e9:.0f} + {n_out} x {dense * 1e9:.0f}) ns "
          f"= {cpu_layer / 3600:.1f} h per layer, x {b['layers']} = {cpu_layer * b['layers'] / 86400:.1f} days; at the "
          f"{share:.0%} share they have on the bench checkpoint, the whole pass "
          f"~{cpu_layer * b['layers'] / max(share, 1e-9) / 86400:.1f} days")
    flops = b["tokens"] * (4 * n_out + 6 * b["top_k"]) * b["hidden"] * b["inter"]     # gate+up dense, all routed
    weights = 3 * b["experts"] * b["hidden"] * b["inter"] * 2                          # bf16 bytes per layer
    traffic = 2 * b["tokens"] // b["batch"] * weights + b["tokens"] * n_out * b["inter"] * 4 * 4
    print(f"  FLOPs per layer: {b['tokens']} x (4 x {n_out} + 6 x {b['top_k']}) x {b['hidden']} x {b['inter']} = "
          f"{flops:.2e}; bytes moved ~{traffic:.2e} (weights twice per batch of {b['batch']} tokens, the output "
          f"experts' hidden activations written and read twice in float32)")
    for name, fl, bw in (("float32 (no TF32)", 50e12, 3.0e12), ("bfloat16", 400e12, 3.0e12)):
        t = max(flops / fl, traffic / bw)
        print(f"  one GPU, {name}, ASSUMING {fl / 1e12:.0f} TFLOP/s sustained and {bw / 1e12:.1f} TB/s: "
              f"max({flops / fl:.0f} s, {traffic / bw:.0f} s) = {t:.0f} s per layer, "
              f"{t * b['layers'] / 60:.0f} min for {b['layers']} layers (statistics only)")
    stats = 8 * (b["experts"] * (6 + 3 * b["hidden"] + b["inter"]) + b["experts"] ** 2) + 32768 * b["hidden"] * 4
    print(f"  memory: one layer ~{weights / 1e9:.1f} GB (bf16) x the layer multiple of the memory bench, + the "
          f"statistics {stats / 1e6:.0f} MB (8 x (N(6 + 3H + D) + N^2) + 32768 x H x 4), + one batch, + the hidden "
          f"states up to 2 x --memory-budget, + at most {ObserveOptions.pair_bytes >> 20} MB of the alignment's "
          f"neuron products (taken only when they fit); none of it grows with the calibration tokens")


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "child":
    child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
