"""``reamkit quantize``: one reference GGUF -> a ladder of quantized GGUFs with the pinned ``llama-quantize``.

Output folder layout (``<model>`` is the model's folder or GGUF name)::

    <model>.F16.gguf / .BF16.gguf    reference, converted from an HF checkpoint (kept for evaluation)
    <model>.imatrix.gguf             importance matrix (computed, or built from compression statistics)
    <model>.<TYPE>.gguf              static ladder;  <model>.<TYPE>-moe.gguf  MoE-aware ladder
    *.manifest.json                  what each file was made from; a rerun skips files that are current

Everything a user can get wrong is checked before any work starts; each file is written to a temporary name
and renamed when complete, so a killed run leaves no partial output and a rerun picks up where it stopped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import defaults
from ..errors import ReamkitError, ToolchainError
from ..fsutil import atomic_file, check_writable
from ..identity import file_hash
from ..llamacpp.gguf_file import check_gguf
from ..llamacpp.tools import run_tool
from ..manifest import Manifest, existing_output_is_current, manifest_path_for, read_manifest, stage_key, write_manifest
from . import imatrix as im
from .inventory import Inventory, inventory_from_config, inventory_from_gguf
from .ladders import LADDERS, ladder_overrides, parse_types
from .rules import REFERENCE_TYPES, choose_types
from .sizes import _num, data_bytes, estimate_header_bytes, pad

_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+- \[.*?\], type =\s*(\w+),")
_CONVERTING = re.compile(r"converting to (\w+)")
_FALLBACKS = re.compile(r"(\d+) of \d+ tensor\(s\) required fallback quantization")
_EXTRA_KV_BYTES = 512          # reamkit.* and quantize.imatrix.* key/values added to the reference header


@dataclass
class QuantizeOptions:
    types: list[str] | str | None = None     # default: the 11-type ladder
    ladder: str = defaults.LADDER_KIND       # "static" or "moe-aware"
    imatrix: str = defaults.IMATRIX          # "auto", "none", or an imatrix GGUF / observations safetensors
    keep_type: str = defaults.KEEP_TYPE      # MoE-aware ladder: type of the always-active tensors
    name: str | None = None                  # file name stem (default: the model's name)
    reference_dtype: str = defaults.REFERENCE_DTYPE   # HF input: f16, bf16, f32, or auto (bf16 for bf16 checkpoints)
    threads: int | None = None
    calibration: str | None = None           # llama-imatrix text: mixture spec (default: defaults.CALIB_MIX)
    imatrix_chunks: int = defaults.IMATRIX_CHUNKS   # llama-imatrix: chunks x ctx calibration tokens
    imatrix_ctx: int = defaults.IMATRIX_CTX
    progress: bool = True


@dataclass
class Variant:
    type: str
    path: Path
    bytes: int
    predicted_bytes: int
    seconds: float
    skipped: bool
    fallbacks: int = 0
    type_mismatches: list[str] = field(default_factory=list)


@dataclass
class QuantizeResult:
    reference: Path
    variants: list[Variant]
    imatrix: im.ImatrixInfo | None
    warnings: list[str]


def quantize_model(model: str | Path, out_dir: Path, opts: QuantizeOptions | None = None) -> QuantizeResult:
    opts = opts or QuantizeOptions()
    file_types = parse_types(opts.types)
    if opts.ladder not in LADDERS:
        raise ReamkitError(f"unknown ladder {opts.ladder!r}; choose one of: {', '.join(LADDERS)}")
    for ft in file_types:
        ladder_overrides(opts.ladder, ft, opts.keep_type)              # validates keep_type
    out_dir = Path(out_dir)
    src, imatrix_arg = _source_and_imatrix(model, out_dir, opts)
    _check_disk_space(src, out_dir, file_types, opts)

    reference, ref_key, inv, info = _prepare(src, imatrix_arg, model, out_dir, opts)
    warnings = []
    if info is not None and info.min_coverage < 1.0:
        low = {b: f"{c:.0%}" for b, c in info.coverage.items() if c < 1.0}
        warnings.append(f"imatrix expert coverage below 100% in {len(low)} block(s): {low}; experts that saw no "
                        "calibration data are quantized with uniform importance")
    header = inv.header_bytes + _EXTRA_KV_BYTES
    variants = _run_ladder(reference, ref_key, inv, header, src.name, out_dir, file_types, info, opts)
    return QuantizeResult(reference=reference, variants=variants, imatrix=info, warnings=warnings)


def prepare_reference(model: str | Path, out_dir: Path, opts: QuantizeOptions | None = None) -> tuple[Path, Path | None]:
    """The first half of :func:`quantize_model`: the reference GGUF and the importance matrix, no ladder.

    Returns ``(reference GGUF, imatrix GGUF or None)``; both land in ``out_dir`` under the names
    :func:`quantize_model` uses, so a later call for any type finds them current. Lets a caller quantize the
    ladder's types in parallel processes, each passing the reference and the imatrix file explicitly.
    """
    opts = opts or QuantizeOptions()
    out_dir = Path(out_dir)
    src, imatrix_arg = _source_and_imatrix(model, out_dir, opts)
    reference, _, _, info = _prepare(src, imatrix_arg, model, out_dir, opts)
    return reference, (info.path if info is not None else None)


def _source_and_imatrix(model: str | Path, out_dir: Path, opts: QuantizeOptions):
    """The checks that need no work: the output folder is writable, what the source is, and whether the imatrix
    request can be met."""
    check_writable(out_dir)
    src = _Source.resolve(model, out_dir, opts)
    imatrix_arg = _check_imatrix_arg(opts.imatrix, src.inventory)
    if imatrix_arg == "auto":
        im.check_calibration(opts.calibration)
    return src, imatrix_arg


def _prepare(src: _Source, imatrix_arg, model, out_dir: Path, opts: QuantizeOptions):
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = src.materialize()
    inv = src.inventory if src.model is None else inventory_from_gguf(reference)   # parse each GGUF once
    check_gguf(reference)
    ref_key = file_hash(reference)
    info = _resolve_imatrix(imatrix_arg, model, reference, ref_key, inv, src.name, out_dir, opts)
    return reference, ref_key, inv, info


@dataclass
class _Source:
    name: str
    inventory: Inventory
    reference: Path
    model: str | Path | None = None          # HF model to convert, if any
    dtype: str = ""

    @classmethod
    def resolve(cls, model: str | Path, out_dir: Path, opts: QuantizeOptions) -> _Source:
        path = Path(model)
        if path.suffix == ".gguf" or path.is_file():
            inv = inventory_from_gguf(path)
            quantized = sorted({t.type for t in inv.tensors} - set(REFERENCE_TYPES))
            if quantized:
                raise ReamkitError(f"{path} is already quantized ({', '.join(quantized)}); "
                                   "quantize from the F16/BF16/F32 reference GGUF instead")
            name = opts.name or re.sub(r"\.(f16|bf16|f32)$", "", path.stem, flags=re.I)
            return cls(name=name, inventory=inv, reference=path)
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ReamkitError(f"{model} is neither a GGUF file nor a model folder with a config.json")
        try:
            config = json.loads(cfg.read_text())
        except ValueError as e:
            raise ReamkitError(f"{cfg} is not valid JSON: {e}") from None
        dtype = opts.reference_dtype.lower()
        if dtype == "auto":
            dtype = "bf16" if "bfloat16" in str(config.get("torch_dtype") or config.get("dtype")) else "f16"
        if dtype.upper() not in REFERENCE_TYPES:
            raise ReamkitError(f"unknown reference dtype {opts.reference_dtype!r}; choose auto, f16, bf16 or f32")
        name = opts.name or path.resolve().name
        inv = inventory_from_config(config, ref_type=dtype.upper())
        return cls(name=name, inventory=inv, reference=out_dir / f"{name}.{dtype.upper()}.gguf", model=path, dtype=dtype)

    def materialize(self) -> Path:
        if self.model is None:
            return self.reference
        from ..gguf import convert_to_gguf

        path, _ = convert_to_gguf(self.model, self.reference, dtype=self.dtype)
        return path


def _check_imatrix_arg(arg: str, inv: Inventory) -> str | Path:
    if arg in ("auto", "none"):
        return arg
    path = Path(arg)
    if not path.is_file():
        raise ReamkitError(f"imatrix file {path} does not exist", fix="pass an imatrix GGUF, auto or none")
    if path.suffix == ".safetensors":
        im.check_observations(path, inv)
        return path
    im.check_fits(path, inv)
    return path


def _check_disk_space(src: _Source, out_dir: Path, file_types: list[str], opts: QuantizeOptions) -> None:
    """Refuse up front when the outputs still to write cannot fit (the predictor knows their sizes)."""
    inv = src.inventory
    header = estimate_header_bytes(inv, 0, Path("/nonexistent")) + 4096
    need = 0 if src.reference.exists() else header + data_bytes(inv, {t.name: t.type for t in inv.tensors})
    for ft in file_types:
        target = out_dir / f"{src.name}.{ft}{LADDERS[opts.ladder]}.gguf"
        if not target.exists():
            types = choose_types(inv.tensors, ft, inv.facts, overrides=ladder_overrides(
                opts.ladder, ft, opts.keep_type, tensors=inv.tensors, facts=inv.facts, arch=inv.arch))
            need += header + data_bytes(inv, types)
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ReamkitError(f"not enough disk space in {probe}: the outputs need {need / 1e9:.2f} GB, "
                           f"{free / 1e9:.2f} GB is free", fix="free some space or choose fewer --types")


def _resolve_imatrix(arg, model, reference: Path, ref_key: str, inv: Inventory, name: str, out_dir: Path,
                     opts: QuantizeOptions) -> im.ImatrixInfo | None:
    if arg == "none":
        return None
    if isinstance(arg, Path) and arg.suffix != ".safetensors":
        return im.describe(arg, inv, "file")
    observations = arg if isinstance(arg, Path) else im.find_observations(Path(model))
    target = out_dir / f"{name}.imatrix.gguf"
    if observations is not None:
        params = {"source": "observations", "observations_sha256": file_hash(observations)}
    else:
        params = {"source": "llama-imatrix", "chunks": opts.imatrix_chunks, "ctx": opts.imatrix_ctx,
                  "calibration": opts.calibration or "default"}
    key = stage_key("imatrix", {"reference": ref_key}, params)
    if not existing_output_is_current(target, key, "importance matrix", folder=False):
        with atomic_file(target) as tmp:
            if observations is not None:
                im.imatrix_from_observations(observations, inv, tmp)
            else:
                with _Bar(opts.progress, "imatrix (llama-imatrix)", None) as bar:
                    im.compute_imatrix(reference, tmp, spec=opts.calibration, chunks=opts.imatrix_chunks,
                                       ctx=opts.imatrix_ctx,
                                       threads=opts.threads, on_line=bar.imatrix_line)
            write_manifest(manifest_path_for(target, folder=False), Manifest.new(
                "imatrix", inputs={"reference": ref_key}, params=params,
                info={"reference": str(reference), "observations": str(observations or "")},
                outputs={"sha256": file_hash(tmp)}))
    return im.describe(target, inv, "compression observations" if observations else "llama-imatrix")


def _run_ladder(reference: Path, ref_key: str, inv: Inventory, header: int, name: str, out_dir: Path,
                file_types: list[str], info: im.ImatrixInfo | None, opts: QuantizeOptions) -> list[Variant]:
    from ..llamacpp.toolchain import find_toolchain

    commit = find_toolchain().commit
    variants = []
    with _Bar(opts.progress, "quantize", len(file_types) * len(inv.tensors)) as bar:
        for ft in file_types:
            target = out_dir / f"{name}.{ft}{LADDERS[opts.ladder]}.gguf"
            overrides = ladder_overrides(opts.ladder, ft, opts.keep_type, tensors=inv.tensors, facts=inv.facts,
                                         arch=inv.arch, has_imatrix=info is not None)
            expected = choose_types(inv.tensors, ft, inv.facts, overrides=overrides, has_imatrix=info is not None)
            predicted = pad(header) + data_bytes(inv, expected)
            params = {"type": ft, "ladder": opts.ladder, "overrides": overrides, "llama_cpp_commit": commit}
            inputs = {"reference": ref_key, "imatrix_sha256": info.sha256 if info else None}
            key = stage_key("quantize", inputs, params)
            bar.start(f"{target.name}")
            if existing_output_is_current(target, key, "quantized GGUF", folder=False):
                bar.advance(len(inv.tensors))
                found = read_manifest(target, folder=False)
                variants.append(Variant(ft + LADDERS[opts.ladder], target, target.stat().st_size, predicted, 0.0,
                                        True, int(found.outputs.get("fallbacks", 0)) if found else 0))
                continue
            t0 = time.perf_counter()
            with atomic_file(target) as tmp:
                lines = run_tool("llama-quantize", _quantize_args(reference.resolve(), tmp.resolve(), ft, overrides, info,
                                                                  opts), cwd=info.path.parent if info else None,
                                 on_line=bar.tensor_line).lines
                got = tensor_types_from_log(lines)
                if len(got) != len(inv.tensors):
                    raise ToolchainError(f"llama-quantize wrote {len(got)} of {len(inv.tensors)} tensors to {target.name}")
                mismatches = [f"{n}: {got[n]} (predicted {t})" for n, t in expected.items() if got.get(n) != t]
                fallbacks = sum(int(m.group(1)) for ln in lines if (m := _FALLBACKS.search(ln)))
                size = tmp.stat().st_size
                seconds = time.perf_counter() - t0
                write_manifest(manifest_path_for(target, folder=False), Manifest.new(
                    "quantize", inputs=inputs, params=params,
                    info={"reference": str(reference), "seconds": round(seconds, 3),
                          "imatrix": str(info.path) if info else None},
                    outputs={"file": target.name, "bytes": size, "sha256": file_hash(tmp), "predicted_bytes": predicted,
                             "fallbacks": fallbacks, "type_mismatches": mismatches}))
            variants.append(Variant(ft + LADDERS[opts.ladder], target, size, predicted, seconds, False, fallbacks,
                                    mismatches))
    return variants


def tensor_types_from_log(lines: list[str]) -> dict[str, str]:
    """``{tensor: written type}`` from llama-quantize's log (a note may split a tensor's line in two)."""
    got: dict[str, str] = {}
    current = None
    for ln in lines:
        m = _TENSOR_LINE.match(ln)
        if m:
            current = m.group(3)
            got[current] = m.group(4).upper()
        conv = _CONVERTING.search(ln)
        if conv and current is not None:
            got[current] = conv.group(1).upper()
    return got


def _quantize_args(reference: Path, out: Path, ft: str, overrides, info, opts: QuantizeOptions) -> list:
    args: list = []
    if info is not None:   # by name, run from its folder: llama-quantize records the path in the GGUF it writes
        args += ["--imatrix", info.path.name]
    for pattern, ty in overrides:
        args += ["--tensor-type", f"{pattern}={ty.lower()}"]
    kv = {"reamkit.ladder": opts.ladder,
          "reamkit.imatrix": f"{info.source}: {info.path.name}" if info else "none",
          "reamkit.imatrix.sha256": info.sha256 if info else "none"}
    for k, v in kv.items():
        args += ["--override-kv", f"{k}=str:{v[:127]}"]
    return [*args, reference, out, ft, opts.threads or os.cpu_count() or 1]


class _Bar:
    """A rich progress bar on stderr over the ladder's tensors (or the imatrix's chunks); silent if off."""

    def __init__(self, enabled: bool, what: str, total: int | None):
        self.enabled, self.what, self.total = enabled, what, total
        self.progress = None

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self.progress.start()
            self.task = self.progress.add_task(self.what, total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def start(self, label: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=label)

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def tensor_line(self, line: str) -> None:
        if _TENSOR_LINE.match(line):
            self.advance()

    def imatrix_line(self, line: str) -> None:
        m = re.search(r"computing over (\d+) chunks", line)
        if m and self.progress is not None:
            self.progress.update(self.task, total=int(m.group(1)))


def variants_table(result: QuantizeResult):
    from rich.table import Table

    title = f"reference {result.reference.name}"
    if result.imatrix is not None:
        title += f"; imatrix {result.imatrix.path.name} ({result.imatrix.source}, expert coverage " \
                 f"{result.imatrix.min_coverage:.0%} at least)"
    table = Table("file", "GB", "GiB", "bpw", "predicted", "seconds", "", title=title)
    n = sum(t.n_elements for t in inventory_from_gguf(result.reference).tensors)
    for v in result.variants:
        note = "up to date" if v.skipped else "written"
        if v.fallbacks:
            note += f", {v.fallbacks} tensor(s) fell back (row length not a block multiple)"
        table.add_row(v.path.name, _num(v.bytes / 1e9), _num(v.bytes / 2**30), f"{v.bytes * 8 / n:.2f}",
                      f"{(v.predicted_bytes / v.bytes - 1) * 100:+.2f}%", f"{v.seconds:.1f}", note)
    return table
