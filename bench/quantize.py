"""Overhead of ``reamkit quantize`` over calling the pinned ``llama-quantize`` directly.

Prints the ladder's wall time divided by the sum of direct ``llama-quantize`` calls on the same reference GGUF
(same types, same thread count, no imatrix). The target is at most 1.05: reamkit's checks, manifests and atomic
renames should cost next to nothing beside the quantizer itself. Each side runs ``--repeats`` times,
alternating, and the fastest run of each is compared, so that load from other processes evens out.

    python bench/quantize.py [--family qwen3_next] [--types Q2_K,Q4_K_M,...] [--repeats 2] [--gguf FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def direct(reference: Path, out: Path, types: list[str], threads: int) -> float:
    from reamkit.llamacpp.toolchain import find_toolchain

    quantize = str(find_toolchain().tool("llama-quantize"))
    t0 = time.perf_counter()
    for t in types:
        subprocess.run([quantize, str(reference), str(out / f"direct.{t}.gguf"), t, str(threads)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def ladder(reference: Path, out: Path, types: list[str], threads: int) -> float:
    from reamkit.quantization import QuantizeOptions, quantize_model

    t0 = time.perf_counter()
    quantize_model(reference, out, QuantizeOptions(types=types, imatrix="none", threads=threads, progress=False))
    return time.perf_counter() - t0


def main() -> None:
    from reamkit.quantization import LADDER

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="qwen3_next", help="tiny zoo model to convert (ignored with --gguf)")
    ap.add_argument("--gguf", type=Path, help="an F16/BF16 reference GGUF to use instead")
    ap.add_argument("--types", default=",".join(LADDER))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    types = args.types.split(",")
    with tempfile.TemporaryDirectory(prefix="reamkit-bench-") as tmp:
        tmp = Path(tmp)
        reference = args.gguf
        if reference is None:
            from reamkit.gguf import convert_to_gguf
            from reamkit.zoo import build_cached

            reference, _ = convert_to_gguf(build_cached(args.family), tmp / f"{args.family}.F16.gguf", dtype="f16")
        times: dict[str, list[float]] = {"direct": [], "reamkit": []}
        for i in range(args.repeats):
            for name, fn in (("direct", direct), ("reamkit", ladder)):
                out = tmp / f"{name}-{i}"
                out.mkdir()
                times[name].append(fn(reference, out, types, args.threads))
                shutil.rmtree(out)
        d, r = min(times["direct"]), min(times["reamkit"])
        print(f"reference: {reference.name}, {len(types)} types, {args.threads} threads, best of {args.repeats}")
        print(f"direct llama-quantize calls: {d:.2f} s   reamkit quantize: {r:.2f} s   "
              f"ratio {r / d:.3f} (target <= 1.05)")
        sys.exit(0 if r / d <= 1.05 else 1)


if __name__ == "__main__":
    main()
