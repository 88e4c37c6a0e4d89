"""Atomic outputs: every file or folder reamkit produces appears whole or not at all.

Work happens in a hidden temporary sibling (same filesystem) that is renamed into place at the end;
a killed run leaves only a ``.<name>.tmp-<pid>-*`` entry, which the next run removes once that process
is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(target: Path) -> list[Path]:
    """Remove temporaries left next to ``target`` by killed runs (those whose process is gone)."""
    parent = target.parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for stale in parent.glob(f".{target.name}.tmp-*"):
        pid = stale.name[len(f".{target.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue  # another live run is writing it
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` when the block succeeds.

    ``target`` must not exist (callers decide what an existing output means before calling).
    On any exception the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _fsync_tree(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_replace_dir(target: Path) -> Iterator[Path]:
    """Like :func:`atomic_dir`, but an existing ``target`` is replaced once the new folder is complete.

    The old folder is renamed aside, the new one renamed into place, and only then is the old one removed,
    so at every moment one complete version exists under ``target`` or its ``.old`` sibling.
    """
    target = Path(target)
    staging = target.with_name(f".{target.name}.new")
    if staging.exists():
        shutil.rmtree(staging)
    with atomic_dir(staging) as tmp:
        yield tmp
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder that is renamed onto ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    fd, name = tempfile.mkstemp(prefix=_tmp_prefix(target), dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (pretty, sorted keys, trailing newline)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def run_relative(path: Path, run_dir: Path) -> str:
    """How a run folder records a file: relative to the run folder when inside it (so the folder can be moved),
    else absolute."""
    p, root = Path(path).resolve(), Path(run_dir).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def _existing(folder: Path) -> Path:
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(folder: Path) -> None:
    """Refuse, before any work, an output folder that cannot be written (read-only file system, no permission)."""
    from .errors import from_os_error

    where = _existing(folder)
    try:
        fd, name = tempfile.mkstemp(prefix=".reamkit-probe-", dir=where)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise from_os_error(OSError(e.errno, e.strerror, str(folder))) from None


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse, before any work, an output whose predicted size does not fit in the free space."""
    from .errors import MachineError

    free = shutil.disk_usage(_existing(folder)).free
    if need > free:
        raise MachineError(f"{what} needs about {need / 1e6:,.0f} MB in {folder}, only {free / 1e6:,.0f} MB are free",
                           fix="free some space or choose another output folder")
