"""The process heap during the layer pass (glibc): where large blocks come from, and handing freed pages back.

While a layer is planned, large blocks are mapped on their own (:data:`PLANNING`) so that freeing them returns
them to the system; glibc's heap otherwise keeps freed blocks, fragmented, up to 0.2 GB more on the bench
checkpoint. Forward-pass work -- the calibration batches through a layer, or through some experts again while a
plan is made -- keeps glibc's usual threshold (:data:`FORWARD`): mapping each of its large temporaries afresh
costs ~80 % more time in page faults. Elsewhere than glibc these are no-ops.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from contextlib import contextmanager

FORWARD = 32 << 20          # the ceiling glibc's own adaptive threshold settles at
PLANNING = 1 << 20
_M_MMAP_THRESHOLD = -3
_current = [FORWARD]


def mmap_threshold(nbytes: int) -> None:
    """Serve allocations of ``nbytes`` or more by their own mappings (glibc's mallopt)."""
    _current[0] = nbytes
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes)
    except (OSError, AttributeError):                  # not glibc
        pass


@contextmanager
def heap_mode(nbytes: int) -> Iterator[None]:
    """:func:`mmap_threshold` ``nbytes`` inside the block, the previous threshold after it."""
    previous = _current[0]
    mmap_threshold(nbytes)
    try:
        yield
    finally:
        mmap_threshold(previous)


def release_memory() -> None:
    """Collect, then return freed heap pages to the system (glibc's malloc_trim), so the next layer starts low."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:                                   # not glibc: nothing to trim
        pass
