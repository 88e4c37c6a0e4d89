"""Stage manifests: what an output was made from, with which parameters and versions.

Every stage writes its output atomically together with a manifest. A rerun with the same inputs and
parameters finds a matching manifest and skips the work; an output path that holds something made from
other inputs is refused rather than overwritten.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from .errors import OutputExistsError
from .fsutil import write_json

MANIFEST_NAME = "reamkit-manifest.json"


class Manifest(BaseModel):
    stage: str
    key: str = Field(description="hash of inputs + params; equal keys mean equal outputs")
    inputs: dict[str, Any] = {}
    params: dict[str, Any] = {}
    versions: dict[str, str] = {}
    outputs: dict[str, Any] = {}
    info: dict[str, Any] = Field(default={}, description="context that does not change the output (paths, timings)")
    created: str = ""

    @classmethod
    def new(cls, stage: str, *, inputs: dict[str, Any], params: dict[str, Any], **kw: Any) -> "Manifest":
        key = stage_key(stage, inputs, params)
        return cls(
            stage=stage,
            key=key,
            inputs=inputs,
            params=params,
            versions=package_versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **kw,
        )


def stage_key(stage: str, inputs: dict[str, Any], params: dict[str, Any]) -> str:
    blob = json.dumps({"stage": stage, "inputs": inputs, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in ("reamkit", "torch", "transformers", "safetensors", "tokenizers", "gguf", "llama_cpp_python"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def manifest_path_for(output: Path, *, folder: bool) -> Path:
    """A folder holds its manifest inside; a file ``x.gguf`` has ``x.gguf.manifest.json`` beside it."""
    output = Path(output)
    return output / MANIFEST_NAME if folder else output.with_name(output.name + ".manifest.json")


def read_manifest(output: Path, *, folder: bool) -> Manifest | None:
    p = manifest_path_for(output, folder=folder)
    if not p.is_file():
        return None
    try:
        return Manifest.model_validate_json(p.read_text())
    except ValueError:
        return None


def write_manifest(path: Path, manifest: Manifest) -> None:
    write_json(path, manifest.model_dump())


def existing_output_is_current(output: Path, key: str, what: str, *, folder: bool) -> bool:
    """True when ``output`` already holds exactly what ``key`` describes (skip the work).

    False when nothing is there. Raises :class:`OutputExistsError` when something else is there:
    reamkit never overwrites an output it did not make from the same inputs.
    """
    output = Path(output)
    if not output.exists():
        return False
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
        return False
    if output.is_dir() != folder:
        raise OutputExistsError(
            f"output path {output} already exists and is a {'folder' if output.is_dir() else 'file'}",
            fix="choose another output path or remove it",
        )
    found = read_manifest(output, folder=folder)
    if found is not None and found.key == key:
        recorded = found.outputs.get("sha256")
        if not recorded or folder:
            return True
        from .identity import file_hash

        if file_hash(output) == recorded:
            return True
        raise OutputExistsError(f"output {output} changed after it was written (its bytes no longer match its "
                                "manifest)", fix="remove it and its manifest to make it again")
    reason = "made from other inputs" if found is not None else "not made by reamkit"
    raise OutputExistsError(
        f"output path {output} already holds a different {what} ({reason})",
        fix="choose another output path or remove it",
    )
