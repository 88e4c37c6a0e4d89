#!/usr/bin/env python3
"""Spread of ``reamkit speed`` on this machine as it is, and under a CPU hog on every core.

    .venv/bin/python bench/speed_noise.py [MODEL.gguf] [--threads N] [--rounds 3] [--gen 32] [--prompt 64]

Without a model, the demo model's Q4_K_M is built once (F16 -> Q4_K_M) in a scratch cache folder. Each round
measures the same GGUF twice, in fresh run folders: first as the machine is ("as is": other programs may be
running, and the CPU time they took is printed), then with one busy-loop process per core running (stopped when
the measurement ends). Printed per round and side: tg median, its spread (robust sd / median), the standard error
of the median, samples, the CPU other processes took (cores, mean over batches), the mean run queue (tasks running or waiting for
a CPU) and whether the figure was marked
busy. The result to look for: "as is" on an idle machine has a spread under 10% and is not busy; under the hog
every figure is marked busy.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def demo_q4(folder: Path) -> Path:
    from reamkit.gguf import convert_to_gguf
    from reamkit.llamacpp.tools import run_tool
    from reamkit.zoo import DEMO_MODEL

    from reamkit.errors import OutputExistsError

    q = folder / "demo.Q4_K_M.gguf"
    try:
        f16, made = convert_to_gguf(DEMO_MODEL, folder / "demo.F16.gguf", dtype="f16")
    except OutputExistsError:               # a scratch file an older reamkit made: make both again
        for stale in (folder / "demo.F16.gguf", q):
            stale.unlink(missing_ok=True)
        f16, made = convert_to_gguf(DEMO_MODEL, folder / "demo.F16.gguf", dtype="f16")
    if made or not q.is_file():
        run_tool("llama-quantize", [f16, q, "Q4_K_M", "2"])
    return q


def hogs(n: int) -> list[subprocess.Popen]:
    code = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def measure(gguf: Path, args, hog: bool) -> dict:
    import os

    from reamkit.evaluation.speed import SpeedOptions, measure_speed

    procs = hogs(os.cpu_count() or 1) if hog else []
    try:
        with tempfile.TemporaryDirectory() as run:
            r = measure_speed(gguf, Path(run), SpeedOptions(prompt=args.prompt, gen=args.gen, repetitions=3,
                                                             threads=args.threads, busy_retries=1, busy_wait_s=2))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    others = statistics.fmean(b["others_cores"] for b in r.batches)
    queue = [b["runnable"] for b in r.batches if b.get("runnable") is not None]
    return {"tg": r.tg_tps, "spread": r.tg_spread, "se": r.tg_tps_se, "n": r.tg_samples, "others": others,
            "runnable": statistics.fmean(queue) if queue else float("nan"),
            "busy": r.busy, "threads": r.threads, "batches": len(r.batches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--threads", type=int, default=None, help="default: the cores other processes leave free")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    args = ap.parse_args()
    gguf = args.model or demo_q4(Path(tempfile.gettempdir()) / "reamkit-speed-noise")
    print(f"model {gguf.name}, tg{args.gen}, pp{args.prompt}, threads {args.threads or 'free cores'}")
    rows = {"as is": [], "hog": []}
    for i in range(args.rounds):
        for side in rows:
            m = measure(gguf, args, side == "hog")
            rows[side].append(m)
            print(f"round {i + 1} {side:>5}: tg {m['tg']:8.1f} t/s ± {m['se']:.1f}, spread {m['spread']:.1%}, "
                  f"{m['n']} samples in {m['batches']} batches, {m['threads']} threads, others took "
                  f"{m['others']:.2f} cores, {m['runnable']:.1f} runnable, busy {m['busy']}", flush=True)
    for side, ms in rows.items():
        print(f"{side:>5}: median spread {statistics.median(m['spread'] for m in ms):.1%}, tg medians "
              f"{min(m['tg'] for m in ms):.1f}-{max(m['tg'] for m in ms):.1f} t/s, marked busy "
              f"{sum(m['busy'] for m in ms)}/{len(ms)}, others took {statistics.fmean(m['others'] for m in ms):.2f} "
              "cores on average")


if __name__ == "__main__":
    main()
