#!/usr/bin/env python3
"""Memory and speed of the streamed compression pass on a checkpoint far larger than one layer.

Builds once (cached under the reamkit cache) a generated ``qwen3_next`` checkpoint of 48 decoder layers,
Qwen3-Coder-Next's count, of 163 MB each: about 7.8 GB (bf16; hidden 1024, 48 experts of width 512, top-4),
compresses it by 25 % with REAM in a child process, and prints:

* peak RSS of the child / checkpoint bytes (target <= 0.25; code that loads the whole model needs >= 1.0)
* the same peak as interpreter + libraries (measured in the child before any work) plus a working set, and
  that working set as a multiple of one layer's bytes: the figure that does not depend on the layer count
* calibration tokens per second through the whole pass, and seconds per layer

With ``--tokens`` it sweeps the calibration size instead (:mod:`compress_scale`): a generated checkpoint with
Qwen3-Next's routing shape (512 experts, top-10, a shared expert; hidden and expert width scaled down), one
child per size, its peak RSS, seconds per layer and token-layers/s; then what a Qwen3-Coder-Next compression at
3072 x 512 tokens would take, from expert costs measured at that model's own expert shape.

    python bench/compress.py [--samples 16] [--seq-len 256] [--layers 48]
    python bench/compress.py --tokens 16384,65536,262144 [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def spec(layers: int) -> dict:
    from reamkit.zoo import spec_for

    return spec_for("qwen3_next", hidden_size=1024, num_hidden_layers=layers, num_attention_heads=8,
                    num_key_value_heads=2, head_dim=128, linear_num_key_heads=4, linear_key_head_dim=128,
                    linear_num_value_heads=8, linear_value_head_dim=128, num_experts=48, num_experts_per_tok=4,
                    moe_intermediate_size=512, shared_expert_intermediate_size=512, intermediate_size=512,
                    layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
                    dtype="bfloat16")


def build(out: Path, layers: int) -> Path:
    """Write the checkpoint one decoder layer at a time (never the whole model in memory)."""
    import torch

    from reamkit.checkpoint.writer import CheckpointWriter
    from reamkit.models import get_adapter
    from reamkit.zoo import tokenizer_dir

    if (out / "config.json").is_file():
        return out
    cfg = spec(layers)
    adapter = get_adapter(cfg)
    hf_cfg = adapter.hf_config(cfg)
    torch.manual_seed(0)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    with CheckpointWriter(out, config=cfg, aux_from=tokenizer_dir()) as w:
        w.add({"model.embed_tokens.weight": (torch.randn(v, h) * 0.05).bfloat16(),
               "model.norm.weight": torch.ones(h).bfloat16(), "lm_head.weight": (torch.randn(v, h) * 0.05).bfloat16()})
        for i in range(layers):
            layer = adapter.hf_class("DecoderLayer")(hf_cfg, i)
            state = {k: v.detach() for k, v in layer.state_dict().items()}
            for k, t in state.items():
                if t.ndim >= 2:
                    t.normal_(0, 0.05)
            state["mlp.gate.weight"].mul_(8.0)              # clear routing margins, as the zoo does
            state = adapter.convert_layout(state, "per_expert")
            w.add({f"model.layers.{i}.{k}": t.bfloat16() for k, t in state.items()})
            print(f"  built layer {i + 1}/{layers}", file=sys.stderr, flush=True)
    return out


def child(model: str, out: str, samples: int, seq_len: int) -> None:
    import psutil
    import transformers  # noqa: F401  (part of the baseline, as in any real run)

    from reamkit.compression import CompressOptions, compress
    from reamkit.models import open_model

    m = open_model(model)
    m.adapter.hf_config(m.checkpoint.config)      # imports the family's modeling code (torch, sympy, scipy)
    m.close()
    baseline = psutil.Process().memory_info().rss
    t = time.time()
    res = compress(model, Path(out), CompressOptions(method="ream", ratio=0.25, samples=samples, seq_len=seq_len,
                                                     batch_size=4, memory_budget_gb=0.25))
    rep = res.report
    print(json.dumps({"seconds": time.time() - t, "layers": [lay["seconds"] for lay in rep["layers"]],
                      "tokens": samples * seq_len, "baseline": baseline}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, help="default 256 (512 with --tokens)")
    ap.add_argument("--layers", type=int, help="default 48 (2 with --tokens)")
    ap.add_argument("--tokens", help="comma-separated calibration sizes: sweep them on the routing-shape checkpoint")
    ap.add_argument("--repeat", type=int, default=1,
                    help="with --tokens: runs per size; the peak RSS is their median (it varies run to run)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.tokens:
        from compress_scale import sweep

        sweep([int(t) for t in a.tokens.split(",")], a.layers or 2, a.seq_len or 512, max(1, a.repeat))
        return
    a.layers, a.seq_len = a.layers or 48, a.seq_len or 256
    if a.child:
        child(a.child[0], a.child[1], a.samples, a.seq_len)
        return
    from reamkit.cache import cache_root

    src = cache_root() / "bench" / f"qwen3_next-{a.layers}L-48E-1024H"
    print(f"checkpoint: {src}", file=sys.stderr)
    build(src, a.layers)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    out = Path("/tmp") / "reamkit-bench-compressed"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--samples", str(a.samples), "--seq-len", str(a.seq_len),
                           "--child", str(src), str(out)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    per_layer = res["layers"]
    print(f"checkpoint              {size / 1e9:.2f} GB, {a.layers} layers")
    print(f"peak RSS                {peak / 1e9:.2f} GB = {peak / size:.3f} x the checkpoint (target <= 0.25)")
    layer_bytes = size / a.layers
    working = peak - res["baseline"]
    print(f"  of which              {res['baseline'] / 1e9:.2f} GB interpreter + libraries, "
          f"{working / 1e9:.2f} GB working set = {working / layer_bytes:.1f} x one layer's bytes")
    big_layer, big_ckpt = 3.3e9, 160e9                 # Qwen3-Coder-Next: 48 layers of ~3.3 GB (bf16)
    print(f"  scaled to a 160 GB, 48-layer model (same multiple of a layer): peak ~"
          f"{(res['baseline'] + working / layer_bytes * big_layer) / 1e9:.0f} GB = "
          f"{(res['baseline'] + working / layer_bytes * big_layer) / big_ckpt:.2f} x the checkpoint")
    print(f"calibration tokens/s    {res['tokens'] * a.layers / res['seconds']:.0f} token-layers/s "
          f"({res['tokens']} tokens through {a.layers} layers in {res['seconds']:.1f} s)")
    print(f"seconds per layer       mean {sum(per_layer) / len(per_layer):.2f}, max {max(per_layer):.2f}")


if __name__ == "__main__":
    main()
