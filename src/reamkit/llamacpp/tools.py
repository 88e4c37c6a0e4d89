"""The pinned llama.cpp tools by name: found in the toolchain, given the repacking decision, run by :mod:`.process`."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from . import process
from .process import Finished
from .repack import repack_args, repack_env
from .toolchain import find_toolchain


def run_tool(name: str, args: Sequence, *, on_line: Callable[[str], None] | None = None, cwd: Path | None = None,
             timeout: float | None = None, separate_stdout: bool = False, measure_memory: bool = False,
             on: str | None = None, complete: Callable[[str], bool] | None = None, attempts: int = 1) -> Finished:
    """Run the tool ``name`` (``llama-quantize``, ...) with ``args``; a non-zero exit raises a one-line
    ToolchainError. The options are :func:`.process.run`'s."""
    argv = [find_toolchain().tool(name), *args, *repack_args(name, args)]
    return process.run(argv, name=name, env=repack_env(name), cwd=cwd, on_line=on_line, timeout=timeout,
                       separate_stdout=separate_stdout, measure_memory=measure_memory, on=on, complete=complete,
                       attempts=attempts)


def start_server(cmd: Sequence, *, log: IO[bytes], pass_fds: Sequence[int] = ()) -> subprocess.Popen:
    """Start llama-server (its command line ``cmd``) as :func:`.process.start` starts a long-running process,
    with the repacking decision in its environment."""
    return process.start(cmd, log=log, env=repack_env("llama-server"), pass_fds=pass_fds)
