"""One variant of a run folder, by name: what ``reamkit serve RUN_DIR --variant ...`` serves.

A variant is chosen by its type (``Q4_K_M``), by method and type (``ream:Q4_K_M``), by model and type
(``demo-coder-ream-12e:Q4_K_M``) or by its full name (``demo-coder-ream-12e.Q4_K_M``), case-insensitively;
without a choice, the run's recommended variant (``reamkit compare``). A choice that matches several variants
is refused with the candidates on one line.

The variants are those ``variants.json`` names (paths relative to the run folder), or, before the run's
compare stage has written it, the GGUFs under ``gguf/<model>/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ReamkitError
from .runinfo import read_variants, type_from_name


@dataclass(frozen=True)
class RunVariant:
    name: str                  # <model>.<TYPE>
    model: str
    method: str
    type: str
    path: Path


def is_run_folder(path: Path) -> bool:
    """A folder the release pipeline (or ``reamkit compare``) wrote, as opposed to a folder of GGUF files."""
    path = Path(path)
    return path.is_dir() and any((path / n).exists() for n in ("variants.json", "run.toml", "gguf"))


def run_variants(run_dir: Path) -> list[RunVariant]:
    run_dir = Path(run_dir)
    entries = read_variants(run_dir)
    if entries:
        return [RunVariant(n, e.model or n.rsplit(".", 1)[0], e.method, e.type or type_from_name(n) or "unknown",
                           run_dir / e.path) for n, e in entries.items()]
    found = []
    for p in sorted(run_dir.glob("gguf/*/*.gguf")):
        name = p.name.removesuffix(".gguf")
        if not name.endswith(".imatrix"):
            found.append(RunVariant(name, p.parent.name, "unknown", type_from_name(name) or "unknown", p))
    return found


def label(v: RunVariant, all_variants: list[RunVariant]) -> str:
    """The shortest choice that names ``v`` alone: ``ream:Q4_K_M``, else the full name."""
    short = f"{v.method}:{v.type}"
    same = [w for w in all_variants if f"{w.method}:{w.type}".upper() == short.upper()]
    return short if len(same) == 1 and v.method != "unknown" else v.name


def _matches(v: RunVariant, choice: str) -> bool:
    c = choice.upper()
    if c == v.name.upper():
        return True
    head, sep, t = c.rpartition(":")
    if t != v.type.upper():
        return False
    return not sep or head in (v.method.upper(), v.model.upper())


def recommended(run_dir: Path) -> str | None:
    """The variant ``reamkit compare`` recommends, from ``report/compare.json`` (else computed)."""
    p = Path(run_dir) / "report" / "compare.json"
    try:
        rows = json.loads(p.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        from .compare import comparison_rows

        try:
            rows = comparison_rows(run_dir).rows
        except ReamkitError:
            return None
    return next((r["variant"] for r in rows if "recommended" in (r.get("notes") or [])), None)


def pick_variant(run_dir: Path, choice: str | None = None) -> RunVariant:
    """The variant ``choice`` names (default: the recommended one), or one ReamkitError with the candidates."""
    run_dir = Path(run_dir)
    found = run_variants(run_dir)
    if not found:
        raise ReamkitError(f"{run_dir} holds no GGUF variants yet", fix=f"see reamkit status {run_dir}")
    every = ", ".join(label(v, found) for v in found)
    if choice is None:
        best = recommended(run_dir)
        picked = [v for v in found if v.name == best] or (found if len(found) == 1 else [])
        if not picked:
            raise ReamkitError(f"{run_dir} has no recommended variant yet; choose one with --variant: {every}")
    else:
        picked = [v for v in found if _matches(v, choice)]
        if not picked:
            raise ReamkitError(f"no variant {choice} in {run_dir}; it has: {every}")
        if len(picked) > 1:
            raise ReamkitError(f"--variant {choice} matches {len(picked)} variants of {run_dir}: "
                               f"{', '.join(label(v, found) for v in picked)}; choose one")
    v = picked[0]
    if not v.path.is_file():
        raise ReamkitError(f"{v.name}: no file at {v.path}", fix=f"see reamkit status {run_dir}")
    return v
