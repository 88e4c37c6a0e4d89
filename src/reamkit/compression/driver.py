"""The compression pass: one sequential walk over the decoder layers, one layer in memory at a time.

For each decoder layer: load it alone; run every calibration batch through it while observing its MoE block
(:class:`ExpertStats`); let the method plan the layer; apply the plan; run the batches again through the
*compressed* layer to make the next layer's inputs (sequential methods -- REAM; pruning methods use the
original layer's outputs, which the observing pass already produced); save the layer; free it.
Peak memory: one decoder layer + the hidden states of the calibration set (spilled to disk above a budget) +
the layer's statistics.

Each finished layer is saved in a work folder beside the output, so a run killed at layer 47 resumes there:
the saved layers are replayed (forward only) to rebuild the hidden states, which costs a fraction of
observing. The output -- a normal Hugging Face checkpoint plus ``compression/`` (report, saliency heatmap,
per-expert statistics) -- is assembled from the saved layers and published atomically with a manifest.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint.reader import layer_prefix
from ..checkpoint.writer import CheckpointWriter
from ..errors import ReamkitError
from ..fsutil import atomic_file, write_json
from ..manifest import Manifest, existing_output_is_current, manifest_path_for, write_manifest
from ..models import Model, open_model
from ..models.moe import MoEBlock, capture_moe_input
from ..runtime import LayerwiseModel
from .cache import ActivationCache
from .methods import MethodInput, get_method, method_options
from .observe import ExpertStats, ObserveOptions
from .plan import LayerPlan, apply_plan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass
class CompressOptions:
    method: str = "ream"
    experts: int | None = None            # experts kept per layer
    ratio: float | None = None            # or: fraction of experts removed (0.25 -> 512 becomes 384)
    method_options: dict = field(default_factory=dict)
    calib: str = "code=0.7,math=0.3"
    samples: int = 128
    seq_len: int = 512
    batch_size: int = 8                   # sequences per calibration batch
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    compute_dtype: str = "float32"
    output_dtype: str | None = None       # default: the checkpoint's own
    sequential: bool | None = None        # default: the method's own (REAM yes, pruning no)
    drop_mtp: bool = False
    memory_budget_gb: float = 4.0         # hidden states kept in RAM; beyond, spilled to disk
    max_shard_gb: float = 2.0
    activation_samples: int = 32768
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


def _check(model: Model, opts: CompressOptions) -> tuple[int, list[str], dict]:
    """Every check that can fail before work starts. Returns (experts kept, MTP prefixes, method options)."""
    adapter, config = model.adapter, model.config
    if not adapter.moe_layers(config):
        raise ReamkitError(f"{model.path} has no MoE layers: nothing to compress")
    mod = get_method(opts.method)
    mopts = method_options(opts.method, opts.method_options)
    if hasattr(mod, "check_options"):
        mod.check_options(mopts)
    n = adapter.num_experts(config)
    keep = resolve_target(n, adapter.routing(config).top_k, opts.experts, opts.ratio)
    if opts.samples * opts.seq_len < 2 * opts.batch_size or opts.samples < 1:
        raise ReamkitError(f"calibration set of {opts.samples} x {opts.seq_len} tokens is too small")
    mtp = [p for p in adapter.moe_groups(model.checkpoint) if not p.startswith("model.layers.")]
    if mtp and not opts.drop_mtp:
        raise ReamkitError(f"{model.path} has a multi-token-prediction block ({mtp[0]}) with its own "
                           f"{n} experts; reamkit does not compress it yet, and leaving it uncompressed would make "
                           "the checkpoint inconsistent", fix="pass --drop-mtp to remove it from the output")
    if opts.output_layout not in ("per_expert", "fused"):
        raise ReamkitError(f"unknown expert layout {opts.output_layout!r}; choose per_expert or fused")
    if opts.compute_dtype not in DTYPES or (opts.output_dtype and opts.output_dtype not in DTYPES):
        raise ReamkitError(f"dtypes must be one of {', '.join(DTYPES)}")
    return keep, mtp, mopts


def compress(source: str | Path, out: Path, opts: CompressOptions, progress: Progress | None = None,
             announce: Callable[[str], None] | None = None) -> CompressResult:
    """Compress ``source`` into the Hugging Face model folder ``out`` (see the module docstring)."""
    from ..calibration.mixture import build_calibration, check_source, parse_mix

    out = Path(out)
    model = open_model(source, announce=announce)
    keep, mtp, mopts = _check(model, opts)
    for s in parse_mix(opts.calib):
        check_source(s.name)
    device = resolve_device(opts.device)
    method = get_method(opts.method)
    sequential = method.SEQUENTIAL if opts.sequential is None else opts.sequential
    params = {**asdict(opts), "method_options": mopts, "experts": keep, "ratio": None, "sequential": sequential,
              "device": None}
    params.pop("memory_budget_gb")
    manifest = Manifest.new("compress", inputs={"model_fingerprint": model.checkpoint.fingerprint()}, params=params,
                            info={"source": str(model.path)})
    if existing_output_is_current(out, manifest.key, "compressed model", folder=True):
        return CompressResult(out, json.loads((out / "compression" / "report.json").read_text()), skipped=True)

    ids = build_calibration(model.path, opts.calib, samples=opts.samples, seq_len=opts.seq_len, seed=opts.seed)
    work = out.with_name(f".{out.name}.work")
    state_file = work / "state.json"
    if work.exists() and (not state_file.is_file() or json.loads(state_file.read_text()).get("key") != manifest.key):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(state_file, {"key": manifest.key})

    run = _Pass(model, opts, keep, mopts, method, sequential, device, ids, work, progress)
    layer_reports = run.all_layers()
    report = run.report(layer_reports, manifest.key)
    _publish(model, out, keep, mtp, opts, manifest, report, work)
    shutil.rmtree(work, ignore_errors=True)
    return CompressResult(out, report)


class _Pass:
    def __init__(self, model, opts, keep, mopts, method, sequential, device, ids, work, progress):
        self.model, self.opts, self.keep, self.mopts = model, opts, keep, mopts
        self.method, self.sequential, self.device, self.work = method, sequential, device, work
        self.progress = progress or (lambda info: None)
        self.adapter, self.config = model.adapter, model.config
        self.dtype = DTYPES[opts.compute_dtype]
        self.lw = LayerwiseModel(model, dtype=self.dtype)
        self.batches = [ids[i:i + opts.batch_size] for i in range(0, len(ids), opts.batch_size)]
        self.budget = int(opts.memory_budget_gb * 2**30)
        self.moe = set(self.adapter.moe_layers(self.config))
        self.t0 = time.time()

    def _to(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in t.items()}

    def all_layers(self) -> list[dict]:
        lw, n_layers = self.lw, self.model.num_layers
        lw.embed_weight = lw.embed_weight.to(self.device)
        lw.rotary.to(self.device)
        hidden = ActivationCache(self.work / "h-embed", self.budget)
        for b in self.batches:
            hidden.append(lw.embed(b.to(self.device)))
        ctx = _Contexts(lw)
        reports = []
        tokens = sum(b.numel() for b in self.batches)
        for i in range(n_layers):
            # Unmap the shards between layers: memory-mapped pages a layer touched would otherwise stay
            # resident, and the process would grow to the checkpoint's size.
            self.model.checkpoint.close()
            t_layer = time.time()
            done = self.work / f"layer-{i:05d}.safetensors"
            nxt = ActivationCache(self.work / f"h-{i:05d}", self.budget)
            if done.is_file():                          # resumed: replay the finished layer
                rep = json.loads((self.work / f"layer-{i:05d}.json").read_text())
                tensors = load_file(str(done))
                src = tensors if self.sequential else self.model.checkpoint.load_layer(i)
                layer = lw.layer(i, self._to(src)).to(self.device)
                for j in range(len(hidden)):
                    nxt.append(lw.run_layer(layer, i, hidden[j], ctx(hidden[j])))
                del layer, tensors, src
                rep["resumed"] = True
            else:
                rep = self._layer(i, hidden, nxt, ctx)
            hidden.close()
            hidden = nxt
            rep["seconds"] = round(time.time() - t_layer, 3)
            reports.append(rep)
            elapsed = time.time() - self.t0
            self.progress({"layer": i + 1, "layers": n_layers, "tokens_per_s": tokens * (i + 1) / max(elapsed, 1e-9),
                           "eta_s": elapsed / (i + 1) * (n_layers - i - 1)})
        hidden.close()
        return reports

    @torch.no_grad()
    def _layer(self, i: int, hidden: ActivationCache, nxt: ActivationCache, ctx) -> dict:
        lw, adapter = self.lw, self.adapter
        tensors = self.model.checkpoint.load_layer(i)
        layer = lw.layer(i, self._to(tensors)).to(self.device)
        rep: dict = {"layer": i, "moe": i in self.moe}
        if i not in self.moe:
            for j in range(len(hidden)):
                nxt.append(lw.run_layer(layer, i, hidden[j], ctx(hidden[j])))
            if any(adapter.is_expert_key(k) for k in tensors):
                tensors = adapter.convert_layout(tensors, self.opts.output_layout)
            self._save(i, tensors, rep)
            return rep
        # the block's weights are views of the built layer's own parameters: no second copy of the experts
        block = MoEBlock.from_tensors(adapter, self.config, adapter.layer_tensors(layer, "fused"), dtype=None)
        needs = set(self.method.NEEDS)
        stats = ExpertStats(block.num_experts, block.experts.gate.shape[2], block.experts.gate.shape[1],
                            len(hidden), ObserveOptions(
                                activation_samples=self.opts.activation_samples if "activations" in needs else 0,
                                keep_logits="logits" in needs, seed=self.opts.seed + i))
        seen, handle = capture_moe_input(layer, adapter)
        try:
            for j in range(len(hidden)):
                out = lw.run_layer(layer, i, hidden[j], ctx(hidden[j]))
                x = seen.pop()
                stats.observe(block, x.reshape(-1, x.shape[-1]))
                if self.sequential:
                    del out
                else:
                    nxt.append(out)
        finally:
            handle.remove()
        plan = self.method.plan_layer(MethodInput(stats, block, self.keep, self.mopts,
                                                  sequences=sum(len(b) for b in self.batches)))
        summary = stats.summary_tensors()
        rep["tokens"] = stats.tokens
        rep["frequency"] = [int(v) for v in stats.freq.tolist()]
        del block, stats, layer              # the original layer's weights (the block views them) go now
        new_tensors = self._apply(tensors, plan)
        del tensors
        if self.sequential:
            layer = lw.layer(i, self._to(new_tensors)).to(self.device)
            for j in range(len(hidden)):
                nxt.append(lw.run_layer(layer, i, hidden[j], ctx(hidden[j])))
            del layer
        rep.update(plan.to_json())
        save_file({k: v.contiguous() for k, v in summary.items()},
                  str(self.work / f"stats-{i:05d}.safetensors"))
        self._save(i, new_tensors, rep)
        return rep

    def _apply(self, tensors: dict[str, torch.Tensor], plan: LayerPlan) -> dict[str, torch.Tensor]:
        adapter = self.adapter
        layout = adapter.expert_layout(tensors)
        experts = adapter.experts(tensors)
        router = tensors[adapter.router_key(layout)]
        new_experts, new_router = apply_plan(plan, experts, router)
        return adapter.replace_experts(tensors, new_experts, new_router, self.opts.output_layout)

    def _save(self, i: int, tensors: dict[str, torch.Tensor], rep: dict) -> None:
        out_dtype = DTYPES[self.opts.output_dtype] if self.opts.output_dtype else None
        t = {k: (v.to(out_dtype) if out_dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in tensors.items()}
        path = self.work / f"layer-{i:05d}.safetensors"
        with atomic_file(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(rep))
        with atomic_file(path) as tmp:              # written last: its presence marks the layer done
            save_file(t, str(tmp))

    def report(self, layers: list[dict], key: str) -> dict:
        n = self.adapter.num_experts(self.config)
        return {"method": self.opts.method, "method_options": self.mopts, "experts_before": n,
                "experts_after": self.keep, "top_k": self.adapter.routing(self.config).top_k,
                "sequential": self.sequential, "calibration": {"mix": self.opts.calib, "samples": self.opts.samples,
                                                                "seq_len": self.opts.seq_len, "seed": self.opts.seed},
                "device": str(self.device), "seconds": round(time.time() - self.t0, 2), "key": key,
                "layers": layers}


class _Contexts:
    """Position embeddings and masks per batch shape (the last batch may be smaller)."""

    def __init__(self, lw: LayerwiseModel):
        self.lw, self.cache = lw, {}

    def __call__(self, h: torch.Tensor):
        key = tuple(h.shape[:2])
        if key not in self.cache:
            self.cache[key] = self.lw.context(h)
        return self.cache[key]


def _publish(model: Model, out: Path, keep: int, mtp: list[str], opts: CompressOptions, manifest: Manifest,
             report: dict, work: Path) -> None:
    from .report import write_report

    adapter, ckpt = model.adapter, model.checkpoint
    config = adapter.with_num_experts(model.config, keep)
    config["merge_args"] = {"tool": "reamkit", "method": opts.method, **{k: v for k, v in report.items()
                            if k in ("method_options", "calibration", "sequential", "experts_before")},
                            "dropped": mtp}
    if opts.output_dtype:
        config["torch_dtype"] = config["dtype"] = opts.output_dtype
    out_dtype = DTYPES[opts.output_dtype] if opts.output_dtype else None
    other = {k: v for k, v in ckpt.load_other().items() if not any(k.startswith(p.split("layers.")[0]) for p in mtp)}
    with CheckpointWriter(out, config=config, aux_from=ckpt.path,
                          max_shard_bytes=int(opts.max_shard_gb * 2**30)) as w:
        w.add({k: v.to(out_dtype) if out_dtype is not None and v.is_floating_point() else v for k, v in other.items()})
        for i in range(model.num_layers):
            tensors = load_file(str(work / f"layer-{i:05d}.safetensors"))
            w.add({layer_prefix(i) + k: v for k, v in tensors.items()})
        folder = w.staging
        stats = {}
        for i in range(model.num_layers):
            p = work / f"stats-{i:05d}.safetensors"
            if p.is_file():
                stats.update({f"layers.{i}.{k}": v for k, v in load_file(str(p)).items()})
        (folder / "compression").mkdir()
        if stats:
            save_file(stats, str(folder / "compression" / "observations.safetensors"))
        write_report(folder / "compression", report)
        w.before_publish = lambda path: open_model(path).close()
        write_manifest(manifest_path_for(folder, folder=True), manifest.model_copy(
            update={"outputs": {"experts": keep, "layers": model.num_layers}}))
