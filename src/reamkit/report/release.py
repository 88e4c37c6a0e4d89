"""The release folders: one ``RUN_DIR/release/<model>-GGUF/`` per model of a run, ready to upload as it is
(``hf upload ORG/<model>-GGUF RUN_DIR/release/<model>-GGUF``).

Each holds the model's card (``README.md``, its links pointing at the files beside it), its GGUF variants as
hard links to the run's files (no copies; a copy only where the filesystem cannot link), the importance matrix
and the plots the card shows. A folder is assembled aside and renamed into place, replacing the previous one.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ..fsutil import atomic_replace_dir
from .card import card_files, card_markdown
from .compare import Comparison, comparison_rows


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, dst)


def write_release(run_dir: Path, comp: Comparison | None = None) -> list[Path]:
    """Assemble ``release/<model>-GGUF/`` for every model whose variants the run holds; returns the folders."""
    run_dir = Path(run_dir)
    comp = comp or comparison_rows(run_dir)
    models = list(dict.fromkeys(r["model"] for r in comp.rows if r.get("model") and r.get("path")))
    folders = []
    for model in models:
        rows = [r for r in comp.rows if r.get("model") == model and r.get("path")
                and (run_dir / r["path"]).is_file()]
        if not rows:
            continue
        extra = card_files(run_dir, {model})
        target = run_dir / "release" / f"{model}-GGUF"
        with atomic_replace_dir(target) as tmp:
            for rel in [Path(r["path"]) for r in rows] + extra["plots"] + extra["imatrix"]:
                _link(run_dir / rel, tmp / rel.name)
            (tmp / "README.md").write_text(card_markdown(comp, model=model, beside=True), encoding="utf-8")
        folders.append(target)
    return folders
