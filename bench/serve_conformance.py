#!/usr/bin/env python3
"""llama.cpp's own server unit tests against plain ``llama-server`` and against ``reamkit serve`` on the same GGUF
(the demo model's F16), per file: tests, passed by each, and every test reamkit serve fails that llama-server
passes, explained (a deliberate difference, with its reason) or not. Exits 1 on an unexplained one.

    .venv/bin/python bench/serve_conformance.py                        # test_basic, _chat_completion, _completion, _security
    .venv/bin/python bench/serve_conformance.py --files test_tokenize.py test_stream.py -k "not slow"

The first run fetches the pinned llama-cpp-python sdist with pip (for the tests) and makes the suite's virtual
environment, both cached under the reamkit cache. ``tests/test_serve_conformance.py`` runs a subset of the same
comparison in the test suite; see ``tests/llama_suite.py`` for how the suite is run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.llama_suite import FILES, compare, run_both, table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="+", default=list(FILES), help="files of tools/server/tests/unit/")
    ap.add_argument("-k", dest="select", help="pytest -k expression")
    ap.add_argument("--test-timeout", type=int, default=120, help="seconds one test may take")
    ap.add_argument("--timeout", type=float, default=5400, help="seconds a side may take in all")
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (outputs, server logs)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="serve-conformance-"))
    work.mkdir(parents=True, exist_ok=True)
    sides, times = run_both(work, tuple(args.files), args.select, args.test_timeout, args.timeout)
    for side in ("llama-server", "reamkit"):
        print(f"{side}: {len(sides[side])} tests in {times[side]:.0f} s", flush=True)
    c = compare(sides["llama-server"], sides["reamkit"])
    print(table(c))
    print(f"outputs: {work}" if args.keep else "")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if c.unexplained:
        print(f"FAILED: {len(c.unexplained)} test(s) llama-server passes fail through reamkit serve, unexplained "
              "(fix reamkit serve, or list a deliberate difference in tests/llama_suite.py DIFFERENCES with its "
              "reason)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
