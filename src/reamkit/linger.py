"""A moment's grace at exit for the llama.cpp tools, so that their last log lines are written.

The pinned llama.cpp logs from a worker thread and deliberately never joins it at exit (its logger is leaked on
purpose, upstream issue 22142). The lines a tool logs just before it returns, which include the summaries reamkit
parses (``llama-perplexity``'s KLD statistics, ``llama-quantize``'s last tensors), are lost whenever that thread
does not get a CPU before the process ends: a few percent of runs on an idle machine, nearly all of them on a
loaded one. A tiny library preloaded into the tool (``LD_PRELOAD``) sleeps briefly in its exit destructor, which
gives the thread that CPU. It is compiled once with the system C compiler (the one that built llama.cpp) into the
reamkit cache.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LINGER_MS = 150
SOURCE = f"""
#include <time.h>
__attribute__((destructor)) static void reamkit_linger(void) {{
    struct timespec t = {{0, {LINGER_MS} * 1000L * 1000L}};
    nanosleep(&t, 0);
}}
"""


@functools.cache
def linger_library() -> Path | None:
    """The preload library (built on first use), or None where no C compiler is found (said once, on stderr)."""
    from .cache import cache_root

    target = cache_root() / "native" / f"linger-{hashlib.sha256(SOURCE.encode()).hexdigest()[:12]}.so"
    if target.is_file():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        print("reamkit: no C compiler found, so llama.cpp tools run without the exit grace; their last log lines "
              "can be lost on a loaded machine (reamkit then reruns them)", file=sys.stderr)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "linger.c", Path(tmp) / "linger.so"
        src.write_text(SOURCE)
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], check=True, capture_output=True)
        os.replace(lib, target)
    return target


def linger_env() -> dict[str, str]:
    """``LD_PRELOAD`` for a llama.cpp tool's environment, keeping whatever the user preloads already."""
    lib = linger_library()
    if lib is None:
        return {}
    current = os.environ.get("LD_PRELOAD", "")
    return {"LD_PRELOAD": f"{current} {lib}".strip()}
