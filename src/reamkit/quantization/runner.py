"""Run a pinned llama.cpp tool, streaming its log, so that it dies with us and fails in one line."""

from __future__ import annotations

import collections
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..children import die_with_parent
from ..errors import ToolchainError
from ..linger import linger_env
from ..toolchain import find_toolchain, last_error_line, repack_env


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
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            rc = proc.wait()
        except BaseException:        # Ctrl-C, SIGTERM: the tool stops now, not when it is done
            proc.kill()
            raise
    if rc != 0:
        why = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
        raise ToolchainError(f"{name} failed ({why}): {last_error_line(chr(10).join(tail))}")
    return lines
