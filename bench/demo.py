"""Wall time of the demo (the README's first command) per stage.

    .venv/bin/python bench/demo.py [-o DIR]       # DIR is removed first: the whole demo runs

Prints, per kind of stage: how many stages, the wall-clock span from the first start to the last finish, and
the summed stage time (more than the span where stages ran in parallel); then the demo's total wall time
against its 15-minute target on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

TARGET_S = 15 * 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, default=Path("/tmp/reamkit-bench-demo"))
    args = ap.parse_args()
    shutil.rmtree(args.output, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "reamkit.cli", "demo", "-o", str(args.output)], check=True,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    run = args.output / "run"
    records = json.loads((run / "pipeline.json").read_text())["stages"]
    starts, ends = {}, {}
    for line in (run / "pipeline.log").read_text().splitlines():
        stamp, _, rest = line.partition(" ")
        word, _, stage = rest.partition(" ")
        when = dt.datetime.fromisoformat(stamp).timestamp()
        if word == "start":
            starts[stage] = when
        elif word == "done":
            ends[stage.split(" in ")[0]] = when
    kinds: dict[str, list[str]] = defaultdict(list)
    for sid in records:
        kinds[sid.split(":")[0]].append(sid)
    print(f"\n{'stage':<12} {'count':>5} {'wall s':>8} {'summed s':>9}")
    for kind, ids in kinds.items():
        span = max(ends[i] for i in ids) - min(starts[i] for i in ids)
        summed = sum(records[i]["seconds"] for i in ids)
        print(f"{kind:<12} {len(ids):>5} {span:>8.0f} {summed:>9.0f}")
    print(f"\ndemo wall time: {wall:.0f} s = {wall / TARGET_S:.2f} x the {TARGET_S // 60}-minute target "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
