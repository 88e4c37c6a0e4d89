"""Read and check a safetensors header without touching the tensor data.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping tensor names to
``{dtype, shape, data_offsets}``, then the data. A file is complete exactly when its size equals
8 + header length + the largest end offset; anything shorter is a truncated download or copy.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """Return ``(entries, metadata)`` of a safetensors file; raise CheckpointError if it is damaged."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path} is truncated or not a safetensors file (header length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"shard {path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None

    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, HeaderEntry] = {}
    data_end = 0
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} has a malformed header entry for tensor {name!r}") from None
        width = DTYPE_BYTES.get(dtype)
        numel = 1
        for d in shape:
            numel *= d
        if width is not None and end - begin != numel * width:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} {dtype}")
        entries[name] = HeaderEntry(dtype, shape, begin, end)
        data_end = max(data_end, end)
    expected = 8 + n + data_end
    if size < expected:
        raise CheckpointError(f"{path} is truncated: {size} bytes, header promises {expected}")
    return entries, metadata
