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


class MachineError(ReamkitError):
    """The machine, not the input, stopped the work (a full disk, a read-only folder)."""

    exit_code = 1


class Interrupted(ReamkitError):
    """Ctrl-C (exit 130) or SIGTERM (exit 143): children stopped, finished work kept for a rerun."""

    exit_code = 130


class Terminated(KeyboardInterrupt):
    """Raised in the main process when SIGTERM arrives, so that it unwinds like Ctrl-C."""


def from_os_error(e: OSError) -> ReamkitError:
    """One line for an operating-system error, naming the file and what to do."""
    import errno

    name = e.filename or "the output"
    resume = "finished work is kept: rerun the same command to resume"
    if e.errno == errno.ENOSPC:
        return MachineError(f"no space left on the device holding {name}", fix=f"free some space; {resume}")
    if e.errno == errno.EROFS:
        return ReamkitError(f"cannot write {name}: the file system is read-only", fix="choose a writable output folder")
    if e.errno in (errno.EACCES, errno.EPERM):
        return ReamkitError(f"cannot write {name}: permission denied", fix="choose a folder you may write to")
    if e.errno == errno.EEXIST:
        return ReamkitError(f"{name} already exists", fix="choose another output path or remove it")
    if e.errno == errno.EDQUOT:
        return MachineError(f"disk quota exceeded writing {name}", fix=f"free some space; {resume}")
    return MachineError(" ".join(str(e).split())[:300] or type(e).__name__)


def machine_error(e: BaseException) -> ReamkitError | None:
    """The one-line form of an operating-system error, also when a library wraps it in its own exception
    (safetensors: ``I/O error: No space left on device (os error 28)``); None for anything else."""
    if isinstance(e, ReamkitError):
        return e
    if isinstance(e, OSError):
        return from_os_error(e)
    code = _os_errno(str(e))
    if code:
        import os

        return from_os_error(OSError(code, os.strerror(code)))
    return None


class writing:  # noqa: N801 - used as ``with writing(path):``
    """Inside the block, an operating-system error (a full disk, a read-only folder) becomes one line naming
    ``path`` rather than whichever temporary file met it."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, ReamkitError) or not isinstance(e, Exception):
            return False
        known = machine_error(e)
        if known is None:
            return False
        errno_ = getattr(e, "errno", None) or _os_errno(str(e))
        if errno_:
            import os

            raise from_os_error(OSError(errno_, os.strerror(errno_), str(self.path))) from None
        raise known from None


def _os_errno(text: str) -> int | None:
    import re

    m = re.search(r"\(os error (\d+)\)", text)
    return int(m.group(1)) if m else None
