"""Reading a GGUF file: the one check that a file is a GGUF, opening it (header and tensor table, never the tensor
data), its metadata fields, and the check before a GGUF is used that it is whole and unchanged."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ReamkitError
from ..identity import file_hash
from ..manifest import manifest_path_for, read_manifest

MAGIC = b"GGUF"
_REMAKE = "remove it and make it again (rerunning the run remakes it)"


def require_gguf(path: str | os.PathLike) -> Path:
    """``path``, or a one-line error where it does not exist or does not begin with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        raise ReamkitError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ReamkitError(f"{path} is not a GGUF file (it does not begin with the GGUF magic bytes)")
    return path


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` on ``path``, or a one-line error for a file that is missing, not a GGUF, or whose
    header and tensor table do not fit in it (truncated, damaged)."""
    from gguf import GGUFReader

    path = require_gguf(path)
    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception:  # noqa: BLE001 - any parse failure means the same thing here
        raise ReamkitError(f"{path} is truncated or damaged: its header and tensor table do not fit in its "
                           f"{size} bytes", fix=_REMAKE) from None
    if end > size:
        raise ReamkitError(f"{path} is truncated: its tensors end at byte {end}, the file has {size}", fix=_REMAKE)
    return reader


def read_field(reader, key: str, default=None):
    """The metadata value ``key`` of an open GGUF; ``default`` where it is absent (an error without one)."""
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise ReamkitError(f"the GGUF has no {key} metadata; is it a model file?")
        return default
    return f.contents()


def check_gguf(path: str | os.PathLike) -> None:
    """Refuse, by name, a GGUF whose header or tensor table does not fit in the file (truncated, damaged), or
    whose bytes differ from what its manifest recorded when it was written."""
    path = Path(path)
    open_gguf(path)
    found = read_manifest(path, folder=False)
    recorded = found.outputs.get("sha256") if found else None
    if recorded and file_hash(path) != recorded:
        raise ReamkitError(f"{path} changed after it was written: its bytes no longer match "
                           f"{manifest_path_for(path, folder=False).name}", fix=_REMAKE)
