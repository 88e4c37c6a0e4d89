"""User-facing errors.

Everything a user can get wrong (a missing shard, a truncated file, an unsupported architecture, ...)
raises :class:`ReamkitError` with a one-line message that names the problem and, where there is one,
the fix. The CLI prints that line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class ReamkitError(Exception):
    """An error caused by the user's input or environment, explained in one line."""

    exit_code = 2

    def __init__(self, message: str, *, fix: str | None = None):
        self.problem = " ".join(message.split())
        self.fix = fix
        super().__init__(self.problem + (f" (fix: {fix})" if fix else ""))


class CheckpointError(ReamkitError):
    """A model folder that cannot be read as a consistent checkpoint."""


class UnsupportedArchitectureError(ReamkitError):
    """A ``model_type`` without an adapter."""


class OutputExistsError(ReamkitError):
    """The output path already holds something else; we never overwrite it."""


class ToolchainError(ReamkitError):
    """The pinned llama.cpp toolchain is missing or a tool failed."""
