"""What a process reamkit starts (a llama.cpp tool, llama-server, a pipeline worker) does when reamkit dies."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:  # pragma: no cover - runs in the child
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux), so that a killed reamkit
    leaves no tool, server or worker behind: SIGKILL for writers, SIGTERM where a clean shutdown matters."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass
