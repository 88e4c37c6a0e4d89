"""What a run folder holds, read in one place: the variants and every measurement of them.

A run folder (``RUN_DIR``) is where the evaluation stages write::

    variants.json              optional: {"<variant>": {"path", "model", "method", "experts", "type"}}
    run.json                   optional: {"model_name", "base_model", "method", "calibration", ...}
    fidelity/<variant>.json    reamkit evaluate (KLD, same top-1, perplexity per held-out set)
    humaneval/<variant>.json   HumanEval: at least {"pass_at_1": float, "n_tasks": int}
    speed/<variant>.json       reamkit speed (pp/tg tokens/s, load time, peak memory, bandwidth share)

``<variant>`` is the GGUF file name without ``.gguf`` (``<name>.<TYPE>.gguf``). ``variants.json`` is written
by the release pipeline; without it a variant's type comes from its file name (else the GGUF's
``general.file_type``), its method is ``"unknown"`` and its path from whatever result names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ValidationError

from ..errors import ReamkitError
from ..fsutil import write_json
from ..quantization.rules import FILE_TYPES, REFERENCE_TYPES

RESULT_KINDS = ("fidelity", "humaneval", "speed")
_TYPE_BY_ID = {**{i: name for name, (i, _) in FILE_TYPES.items()}, **{i: name for name, i in REFERENCE_TYPES.items()}}
_KNOWN_TYPES = {t.upper(): t for t in (*FILE_TYPES, *REFERENCE_TYPES)}


class VariantEntry(BaseModel):
    """One line of ``variants.json``."""

    path: str
    model: str | None = None        # the (compressed) checkpoint folder the GGUF was made from
    method: str = "unknown"         # "none" for the uncompressed model, else "ream", "reap", ...
    experts: int | None = None      # routed experts per layer
    type: str | None = None         # GGUF file type, e.g. "Q4_K_M" or "Q4_K_M-moe"


def write_variants(run_dir: Path, entries: dict[str, VariantEntry | dict]) -> Path:
    """Write ``RUN_DIR/variants.json`` (validated), for the pipeline that produced the variants."""
    checked = {k: (v if isinstance(v, VariantEntry) else VariantEntry(**v)).model_dump() for k, v in entries.items()}
    path = Path(run_dir) / "variants.json"
    write_json(path, checked)
    return path


def read_variants(run_dir: Path) -> dict[str, VariantEntry]:
    path = Path(run_dir) / "variants.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {k: VariantEntry(**v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError, ValidationError) as e:
        first = str(e).splitlines()[0][:160]
        raise ReamkitError(f"{path} is not a valid variants file: {first}") from None


def read_run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ReamkitError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ReamkitError(f"{path} must hold a JSON object")
    return data


def type_from_name(variant: str) -> str | None:
    """``demo.Q4_K_M`` -> ``Q4_K_M``; ``x.Q4_K_M-moe`` -> ``Q4_K_M-moe``; ``x.f16`` -> ``F16``."""
    last = variant.rsplit(".", 1)[-1]
    base, _, suffix = last.partition("-")
    known = _KNOWN_TYPES.get(base.upper())
    if known is None:
        return None
    return known + (f"-{suffix}" if suffix else "")


@dataclass
class GGUFFacts:
    n_params: int
    file_bytes: int
    file_type: str | None
    arch: str


def gguf_facts(path: Path) -> GGUFFacts:
    """Parameter count, size and file type from a GGUF's header (the tensor data is not read)."""
    from ..llamacpp.gguf_file import open_gguf, read_field

    reader = open_gguf(path)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    ftype = reader.fields.get("general.file_type")
    name = _TYPE_BY_ID.get(int(ftype.contents())) if ftype is not None else None
    return GGUFFacts(n_params=n_params, file_bytes=Path(path).stat().st_size, file_type=name,
                     arch=str(read_field(reader, "general.architecture")))


@dataclass
class VariantRecord:
    """Everything the run folder knows about one variant (raw, as the stages wrote it)."""

    name: str
    entry: VariantEntry | None
    path: Path | None
    results: dict[str, dict] = field(default_factory=dict)      # kind -> the stage's JSON


def collect(run_dir: Path) -> tuple[list[VariantRecord], dict]:
    """Every variant of the run with its results, and ``run.json``; refuses a missing or empty folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReamkitError(f"no such run folder: {run_dir}")
    entries = read_variants(run_dir)
    results: dict[str, dict[str, dict]] = {}
    for kind in RESULT_KINDS:
        folder = run_dir / kind
        if not folder.is_dir():
            continue
        for f in sorted(folder.glob("*.json")):
            if f.name.endswith(".manifest.json") or f.name == "bandwidth.json" or f.name.startswith("."):
                continue
            try:
                data = json.loads(f.read_text())
            except ValueError as e:
                raise ReamkitError(f"{f} is not valid JSON: {e}") from None
            if isinstance(data, dict):
                results.setdefault(f.stem, {})[kind] = data
    names = list(dict.fromkeys([*entries, *results]))
    if not any(results.get(n) for n in names):
        raise ReamkitError(f"{run_dir} holds no results (fidelity/, humaneval/ or speed/)",
                           fix="run reamkit evaluate and reamkit speed into it first")
    records = []
    for name in names:
        entry = entries.get(name)
        res = results.get(name, {})
        path = entry.path if entry else next((r["path"] for r in res.values() if isinstance(r.get("path"), str)), None)
        p = Path(path) if path else None
        if p is not None and not p.is_absolute():
            p = run_dir / p                       # variants.json may name files relative to the run folder
        records.append(VariantRecord(name=name, entry=entry, path=p, results=res))
    return records, read_run_info(run_dir)
