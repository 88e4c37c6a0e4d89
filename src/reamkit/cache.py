"""Where reamkit keeps what it builds once (the llama.cpp build, tiny zoo models): one function, used by
the Python code and by ``scripts/bootstrap.sh`` alike."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$REAMKIT_CACHE_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/reamkit``."""
    base = os.environ.get("REAMKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "reamkit")
    return Path(base)


if __name__ == "__main__":   # python -m reamkit.cache: the bootstrap asks here
    print(cache_root())
