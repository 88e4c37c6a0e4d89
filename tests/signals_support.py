"""Starting a command the way a terminal starts a foreground job, for the tests that press Ctrl-C on it."""

from __future__ import annotations

import signal


def as_terminal_job() -> None:
    """``preexec_fn``: SIGINT and SIGQUIT back to their defaults. A shell without job control starts background
    commands with them ignored, and an ignored signal stays ignored in every process started below (a test suite
    run as a background job would otherwise send its Ctrl-C to commands that cannot hear it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
