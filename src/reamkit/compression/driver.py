"""``compress``: check everything, calibrate, walk the layers (:mod:`.layerpass`), publish the output.

The walk keeps one decoder layer in memory at a time. Each finished layer is saved in a work folder beside
the output, so a run killed at layer 47 resumes there: the saved layers are replayed (forward only) to rebuild
the hidden states, which costs a fraction of observing. The output -- a normal Hugging Face checkpoint plus
``compression/`` (report, saliency heatmap, per-expert observations and what they were computed on) -- is
assembled from the saved layers and published atomically with a manifest.

Qwen3-Next's MTP block (``mtp.*``) is compressed with the same method and target as the decoder layers
(calibrated on its real inputs, :mod:`.mtp`), or removed with ``drop_mtp``; never left with the old count.
Observations saved by an earlier run can replace calibration for methods that allow it (:mod:`.reuse`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import defaults
from ..checkpoint.reader import layer_prefix
from ..checkpoint.writer import CheckpointWriter
from ..errors import ReamkitError, writing
from ..fsutil import check_free_space, check_writable, write_json
from ..manifest import Manifest, existing_output_is_current, manifest_path_for, write_manifest
from ..models import Model, open_model
from .layerpass import DTYPES, _Pass
from .methods import MethodOptions, get_method


@dataclass
class CompressOptions:
    method: str = defaults.COMPRESS_METHOD
    experts: int | None = None            # experts kept per layer
    ratio: float | None = None            # or: fraction of experts removed (0.25 -> 512 becomes 384)
    method_options: dict = field(default_factory=dict)   # as given; validated by the method's Options model
    calib: str = defaults.CALIB_MIX
    samples: int = defaults.CALIB_SAMPLES
    seq_len: int = defaults.CALIB_SEQ_LEN
    batch_size: int = defaults.CALIB_BATCH_SIZE   # sequences per calibration batch
    seed: int = defaults.CALIB_SEED
    device: str = defaults.DEVICE         # auto | cpu | cuda | cuda:N
    compute_dtype: str = defaults.COMPUTE_DTYPE
    output_dtype: str | None = None       # default: the checkpoint's own
    sequential: bool | None = None        # default: the method's own (REAM yes, pruning no)
    drop_mtp: bool = False                # remove the MTP block instead of compressing it
    observations: str | None = None       # plan from an earlier run's saved observations (see reuse.py)
    memory_budget_gb: float = defaults.MEMORY_BUDGET_GB   # hidden states kept in RAM; beyond, spilled to disk
    max_shard_gb: float = 2.0
    activation_samples: int = defaults.ACTIVATION_SAMPLES
    output_layout: str = "per_expert"     # per_expert (what save_pretrained and the converters use) or fused


@dataclass
class CompressResult:
    output: Path
    report: dict
    skipped: bool = False


Progress = Callable[[dict], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ReamkitError(f"--device {name} asked for, but this torch has no usable CUDA device "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
                           fix="set up the CUDA build of torch with REAMKIT_TORCH=cuda scripts/bootstrap.sh, or use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ReamkitError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def resolve_target(num_experts: int, top_k: int, experts: int | None, ratio: float | None) -> int:
    if (experts is None) == (ratio is None):
        raise ReamkitError("give exactly one target: --experts N or --ratio R (the fraction of experts removed)")
    if ratio is not None:
        if not 0 <= ratio < 1:
            raise ReamkitError(f"--ratio {ratio} must be in [0, 1): it is the fraction of experts removed")
        experts = num_experts - int(num_experts * ratio)
    assert experts is not None
    if experts >= num_experts:
        raise ReamkitError(f"target of {experts} experts per layer must be fewer than the {num_experts} the model has")
    if experts < top_k:
        raise ReamkitError(f"target of {experts} experts is fewer than top-k = {top_k}: every token needs "
                           f"{top_k} distinct experts")
    return experts


def _check(model: Model, opts: CompressOptions) -> tuple[int, list[str], MethodOptions]:
    """Every check that can fail before work starts. Returns (experts kept, MTP prefixes, method options)."""
    adapter, config = model.adapter, model.config
    if not adapter.moe_layers(config):
        raise ReamkitError(f"{model.path} has no MoE layers: nothing to compress")
    method = get_method(opts.method)
    mopts = method.options(opts.method_options)
    n = adapter.num_experts(config)
    keep = resolve_target(n, adapter.routing(config).top_k, opts.experts, opts.ratio)
    if opts.samples * opts.seq_len < 2 * opts.batch_size or opts.samples < 1:
        raise ReamkitError(f"calibration set of {opts.samples} x {opts.seq_len} tokens is too small")
    if method.holdout(mopts) and -(-opts.samples // opts.batch_size) < 2:
        raise ReamkitError(f"{opts.method} scores its plans on held-out calibration batches, but {opts.samples} "
                           f"sequences make one batch of {opts.batch_size}", fix="give more --samples or a smaller --batch-size")
    mtp = [p for p in adapter.moe_groups(model.checkpoint) if not p.startswith("model.layers.")]
    if opts.output_layout not in ("per_expert", "fused"):
        raise ReamkitError(f"unknown expert layout {opts.output_layout!r}; choose per_expert or fused")
    if opts.compute_dtype not in DTYPES or (opts.output_dtype and opts.output_dtype not in DTYPES):
        raise ReamkitError(f"dtypes must be one of {', '.join(DTYPES)}")
    return keep, mtp, mopts


def compress(source: str | Path, out: Path, opts: CompressOptions, progress: Progress | None = None,
             announce: Callable[[str], None] | None = None) -> CompressResult:
    """Compress ``source`` into the Hugging Face model folder ``out`` (see the module docstring)."""
    from ..calibration.mixture import build_calibration, check_source, parse_mix
    from .reuse import identity, load_observations

    out = Path(out)
    model = open_model(source, announce=announce)
    keep, mtp, mopts = _check(model, opts)
    for s in parse_mix(opts.calib):
        check_source(s.name)
    device = resolve_device(opts.device)
    method = get_method(opts.method)
    sequential = method.sequential if opts.sequential is None else opts.sequential
    fingerprint = model.checkpoint.fingerprint()
    ident = identity(fingerprint, opts, sequential)
    saved = None
    if opts.observations:
        meta, tensors = load_observations(Path(opts.observations), method, sequential, ident)
        saved = {**meta, "tensors": tensors}
        missing = [p for p in ([] if opts.drop_mtp else mtp) if p not in meta.get("layers", {})]
        if missing:
            raise ReamkitError(f"the saved observations have none for the MTP block {missing[0]} (that run dropped "
                               "it)", fix="pass --drop-mtp, or drop --observations")
    params = {**asdict(opts), "method_options": mopts.model_dump(), "experts": keep, "ratio": None,
              "sequential": sequential, "device": None, "observations": None}
    params.pop("memory_budget_gb")
    manifest = Manifest.new("compress", inputs={"model_fingerprint": fingerprint}, params=params,
                            info={"source": str(model.path)})
    if existing_output_is_current(out, manifest.key, "compressed model", folder=True):
        return CompressResult(out, json.loads((out / "compression" / "report.json").read_text()), skipped=True)
    _check_before_work(model, out, keep, saved is None)

    ids = None if saved is not None else build_calibration(model.path, opts.calib, samples=opts.samples,
                                                           seq_len=opts.seq_len, seed=opts.seed)
    work = out.with_name(f".{out.name}.work")
    state_file = work / "state.json"
    if work.exists() and (not state_file.is_file() or json.loads(state_file.read_text()).get("key") != manifest.key):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(state_file, {"key": manifest.key})

    with writing(out):
        run = _Pass(model, opts, keep, mopts, method, sequential, device, ids, work, progress,
                    mtp=[] if opts.drop_mtp else mtp, saved=saved)
        layer_reports = run.all_layers()
        report = run.report(layer_reports, manifest.key)
        if saved is not None:
            report["observations_from"] = str(opts.observations)
        _publish(model, out, keep, mtp, opts, manifest, report, work, ident)
    shutil.rmtree(work, ignore_errors=True)
    return CompressResult(out, report)


def _check_before_work(model: Model, out: Path, keep: int, calibrate: bool) -> None:
    """What can fail late, checked first: the tokenizer, the output folder, the free space, every weight finite."""
    from ..calibration.mixture import check_tokenizer

    if calibrate:
        check_tokenizer(model.path)
    check_writable(out.parent)
    # a lower bound (the layers' work files and the published folder coexist at the end)
    n = model.adapter.num_experts(model.config)
    work = out.with_name(f".{out.name}.work")
    done = sum(p.stat().st_size for p in work.glob("*") if p.is_file()) if work.is_dir() else 0
    need = model.checkpoint.total_nbytes * keep // n - done
    check_free_space(out.parent, need, "the compressed model")
    model.checkpoint.check_finite()


def _publish(model: Model, out: Path, keep: int, mtp: list[str], opts: CompressOptions, manifest: Manifest,
             report: dict, work: Path, ident: dict) -> None:
    from .report import write_report

    adapter, ckpt = model.adapter, model.checkpoint
    config = adapter.with_num_experts(model.config, keep)
    config["merge_args"] = {"tool": "reamkit", "method": opts.method, **{k: v for k, v in report.items()
                            if k in ("method_options", "calibration", "sequential", "experts_before")},
                            "dropped": mtp if opts.drop_mtp else [], "compressed_mtp": [] if opts.drop_mtp else mtp}
    if opts.output_dtype:
        config["torch_dtype"] = config["dtype"] = opts.output_dtype
    out_dtype = DTYPES[opts.output_dtype] if opts.output_dtype else None
    cast = lambda t: {k: v.to(out_dtype) if out_dtype is not None and v.is_floating_point() else v  # noqa: E731
                      for k, v in t.items()}
    # the MTP block's own tensors (mtp.fc, norms) go with it when dropped; its layer is replaced when compressed
    skip = ["mtp."] if opts.drop_mtp and mtp else mtp
    other = {k: v for k, v in ckpt.load_other().items() if not any(k.startswith(p) for p in skip)}
    groups = [(layer_prefix(i), f"{i:05d}", f"layers.{i}.") for i in range(model.num_layers)]
    if not opts.drop_mtp:
        groups += [(p, "mtp-" + p.split(".")[2], p) for p in mtp]
    with CheckpointWriter(out, config=config, aux_from=ckpt.path,
                          max_shard_bytes=int(opts.max_shard_gb * 2**30)) as w:
        w.add(cast(other))
        for prefix, name, _ in groups:
            w.add({prefix + k: v for k, v in load_file(str(work / f"layer-{name}.safetensors")).items()})
        folder = w.staging
        stats, out_stats = {}, {}
        for _, name, key in groups:
            for prefix, into in (("stats", stats), ("ostats", out_stats)):
                p = work / f"{prefix}-{name}.safetensors"
                if p.is_file():
                    into.update({key + k: v for k, v in load_file(str(p)).items()})
        (folder / "compression").mkdir()
        if out_stats:      # what the output experts see: the compressed model's importance matrix
            save_file(out_stats, str(folder / "compression" / "output_observations.safetensors"))
        if stats:
            save_file(stats, str(folder / "compression" / "observations.safetensors"))
            write_json(folder / "compression" / "observations.json", {
                **ident, "layers": {str(r["layer"]): {"tokens": r["tokens"]} for r in report["layers"] if "tokens" in r}})
        write_report(folder / "compression", report)
        w.before_publish = lambda path: open_model(path).close()
        write_manifest(manifest_path_for(folder, folder=True), manifest.model_copy(
            update={"outputs": {"experts": keep, "layers": model.num_layers}}))
