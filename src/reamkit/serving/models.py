"""What ``reamkit serve`` serves: one GGUF file, or one variant of a run folder.

A run folder holds one GGUF per quantization variant, named ``<name>.<TYPE>.gguf`` (``model.Q4_K_M.gguf``);
``--variant Q4_K_M`` picks one (case-insensitive), and a folder with a single GGUF needs no ``--variant``.
Split GGUFs (``-00001-of-00003.gguf``) are served from their first part. A release pipeline's run folder is read
through its ``variants.json`` (:mod:`reamkit.report.pick`: ``--variant Q4_K_M`` or ``ream:Q4_K_M``, default the
recommended variant).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ReamkitError

_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.I)


def variant_of(path: Path) -> str:
    """``model.Q4_K_M.gguf`` -> ``Q4_K_M``; ``model.gguf`` -> ``model``."""
    stem = _SPLIT.sub(".gguf", path.name)[: -len(".gguf")]
    return stem.rsplit(".", 1)[-1]


def variants(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.glob("*.gguf")):
        m = _SPLIT.search(p.name)
        if m and m.group(1) != "00001":
            continue
        found.setdefault(variant_of(p).upper(), p)
    return found


def resolve_model(model: str | Path, variant: str | None = None) -> Path:
    """The GGUF file to serve, or a one-line ReamkitError."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ReamkitError(f"{path} is not a .gguf file")
        if variant and variant_of(path).upper() != variant.upper():
            raise ReamkitError(f"--variant {variant} does not match {path.name}; pass the run folder instead")
        return path
    if not path.is_dir():
        raise ReamkitError(f"{path} not found (expected a .gguf file or a run folder holding them)")
    from ..report.pick import is_run_folder, pick_variant

    if is_run_folder(path):                  # what the release pipeline wrote: its variants.json names the files
        return pick_variant(path, variant).path
    found = variants(path)
    if not found:
        raise ReamkitError(f"no .gguf files in {path}")
    if variant:
        if variant.upper() not in found:
            raise ReamkitError(f"no {variant} variant in {path}; it has: {', '.join(found)}")
        return found[variant.upper()]
    if len(found) > 1:
        raise ReamkitError(f"{path} holds {len(found)} variants ({', '.join(found)}); choose one with --variant")
    return next(iter(found.values()))
