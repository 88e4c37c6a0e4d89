"""Run a pinned llama.cpp tool, streaming its log, so that it dies with us and fails in one line."""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..errors import ToolchainError
from ..linger import linger_env
from ..toolchain import find_toolchain, last_error_line, repack_env

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """A killed reamkit must not leave a tool or worker writing on: the kernel signals the child (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run_tool(name: str, args: list, *, on_line: Callable[[str], None] | None = None,
             cwd: Path | None = None) -> list[str]:
    """Run ``name`` with ``args``; returns its log lines. A non-zero exit raises a one-line ToolchainError."""
    tool = find_toolchain().tool(name)
    tail: collections.deque[str] = collections.deque(maxlen=300)
    lines: list[str] = []
    with subprocess.Popen([str(tool), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1, preexec_fn=die_with_parent, cwd=cwd,
                          env={**os.environ, "LLAMA_LOG_COLORS": "0", **repack_env(name), **linger_env()}) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            lines.append(line)
            if on_line is not None:
                on_line(line)
        rc = proc.wait()
    if rc != 0:
        why = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
        raise ToolchainError(f"{name} failed ({why}): {last_error_line(chr(10).join(tail))}")
    return lines
