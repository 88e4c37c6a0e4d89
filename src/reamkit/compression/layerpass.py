"""The walk over the decoder layers (and Qwen3-Next's MTP layer), one layer in memory at a time.

For each decoder layer: load it alone; run every calibration batch through it while observing its MoE block
(:class:`ExpertStats`); free the built layer; let the method plan; re-read the layer's tensors and apply the
plan; run the batches through the *compressed* layer, recording what its experts see (:class:`OutputStats`,
the compressed model's importance matrix) and, for sequential methods (REAM), making the next layer's inputs
(pruning methods use the original layer's outputs, which the observing pass already produced); save.
After the last decoder layer, an MTP block is calibrated on its real inputs (:mod:`.mtp`) and compressed
the same way. With saved observations (:mod:`.reuse`) no calibration runs: each block is planned from them.
A method that scores its plans by measured error (``auto``) gets a share of the calibration batches held out:
spread evenly over the batches (so over the calibration mix, whose sources come in order), they are not
observed, their MoE inputs are kept for the layer's planning only, and they still pass through the layer.

Memory: the built layer keeps a bf16 checkpoint's experts in bf16 (:mod:`reamkit.models.upcast`); the
observation computes expert outputs a few experts at a time and keeps only small per-expert sums plus the
sampled MoE inputs; alignment features are computed only for merged experts, one at a time; the plan is
applied without stacking copies (kept experts are the loaded tensors themselves) and saved tensor by tensor;
in a sequential pass the observing forward stops at the MoE block and keeps the residual stream there (in place
of the layer's inputs), so the compressed layer's pass computes only residual + MoE, not the attention again;
while a layer is planned, large blocks are mapped on their own so that freeing them returns them to the
system (:func:`mmap_threshold`; glibc's heap otherwise keeps freed blocks, fragmented, up to 0.2 GB more on the
bench checkpoint; doing so in the forward passes as well would cost ~80 % more time in page faults), and the
rest of the freed heap is handed back after the forward passes and after each layer.
"""

from __future__ import annotations

import ctypes
import gc
import json
import time

import torch
from safetensors.torch import load_file

from ..checkpoint.writer import save_safetensors
from ..fsutil import atomic_file
from ..models.moe import MOE_NORM, MoEBlock, capture_moe_input, moe_tail, run_to_moe
from .cache import ActivationCache
from .candidates import heldout_batches, heldout_rows
from .layerwise import LayerwiseModel
from .methods import MethodInput, holdout_fraction
from .observe import ExpertStats, ObserveOptions, OutputStats
from .plan import LayerPlan, apply_plan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_M_MMAP_THRESHOLD = -3


def mmap_threshold(nbytes: int) -> None:
    """Serve allocations of ``nbytes`` or more by their own mappings (glibc's mallopt)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes)
    except (OSError, AttributeError):                  # not glibc
        pass


def release_memory() -> None:
    """Collect, then return freed heap pages to the system (glibc's malloc_trim), so the next layer starts low."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:                                   # not glibc: nothing to trim
        pass


class _Pass:
    def __init__(self, model, opts, keep, mopts, method, sequential, device, ids, work, progress,
                 mtp: list[str] | None = None, saved: dict | None = None):
        self.model, self.opts, self.keep, self.mopts = model, opts, keep, mopts
        self.method, self.sequential, self.device, self.work = method, sequential, device, work
        self.progress = progress or (lambda info: None)
        self.adapter, self.config = model.adapter, model.config
        self.dtype = DTYPES[opts.compute_dtype]
        self.mtp = mtp or []
        self.saved = saved                                   # observations to plan from (no calibration)
        self.lw = LayerwiseModel(model, dtype=self.dtype)
        self.ids = ids
        self.batches = [] if ids is None else [ids[i:i + opts.batch_size] for i in range(0, len(ids), opts.batch_size)]
        self.budget = int(opts.memory_budget_gb * 2**30)
        self.moe = set(self.adapter.moe_layers(self.config))
        self.t0 = time.time()

    def _to(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in t.items()}

    def _loader(self, i: int):
        """Tensors of decoder layer ``i`` (an int) or of an MTP block (its prefix)."""
        return (lambda: self.model.checkpoint.load_layer(i)) if isinstance(i, int) else \
            (lambda: self.model.checkpoint.load_group(i))

    @staticmethod
    def _name(i) -> str:
        return f"{i:05d}" if isinstance(i, int) else "mtp-" + i.split(".")[2]

    def all_layers(self) -> list[dict]:
        lw, n_layers = self.lw, self.model.num_layers
        total = n_layers + len(self.mtp)
        if self.saved is not None:
            return [self._from_saved(i, n + 1, total) for n, i in enumerate([*range(n_layers), *self.mtp])]
        lw.embed_weight = lw.embed_weight.to(self.device)
        lw.rotary.to(self.device)
        lw.norm.to(self.device)
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
            release_memory()
            t_layer = time.time()
            done = self.work / f"layer-{i:05d}.safetensors"
            nxt = ActivationCache(self.work / f"h-{i:05d}", self.budget)
            if done.is_file():                          # resumed: replay the finished layer
                rep = json.loads((self.work / f"layer-{i:05d}.json").read_text())
                tensors = load_file(str(done))
                src = tensors if self.sequential else self.model.checkpoint.load_layer(i)
                layer = lw.layer(i, self._to(src)).to(self.device)
                del tensors, src
                for j in range(len(hidden)):
                    nxt.append(lw.run_layer(layer, i, hidden[j], ctx(hidden[j])))
                del layer
                rep["resumed"] = True
            else:
                rep = self._layer(i, hidden, nxt, ctx)
            hidden.close()
            hidden = nxt
            rep["seconds"] = round(time.time() - t_layer, 3)
            reports.append(rep)
            self._progress(i + 1, total, tokens)
        for n, prefix in enumerate(self.mtp):
            self.model.checkpoint.close()
            release_memory()
            t_layer = time.time()
            reports.append(self._mtp(prefix, hidden, ctx))
            reports[-1]["seconds"] = round(time.time() - t_layer, 3)
            self._progress(n_layers + n + 1, total, tokens)
        hidden.close()
        return reports

    def _progress(self, done: int, total: int, tokens: int) -> None:
        elapsed = time.time() - self.t0
        self.progress({"layer": done, "layers": total, "tokens_per_s": tokens * done / max(elapsed, 1e-9),
                       "eta_s": elapsed / done * (total - done)})

    def _mtp(self, prefix: str, last: ActivationCache, ctx) -> dict:
        """Observe and compress an MTP block on its real inputs (the last layer's outputs + next tokens)."""
        from .mtp import MTPInput, build_index

        name = self._name(prefix)
        if (self.work / f"layer-{name}.safetensors").is_file():
            return {**json.loads((self.work / f"layer-{name}.json").read_text()), "resumed": True}
        make = MTPInput(self.lw, self.dtype, self.device)
        inputs = ActivationCache(self.work / f"h-{name}", self.budget)
        for j, b in enumerate(self.batches):
            inputs.append(make(last[j], b))
        try:
            return self._layer(prefix, inputs, None, ctx, build_index=build_index(self.adapter, self.config))
        finally:
            inputs.close()

    @torch.no_grad()
    def _layer(self, i, hidden: ActivationCache, nxt: ActivationCache | None, ctx,
               build_index: int | None = None) -> dict:
        """Observe, plan, compress and save one layer (``i``: decoder index or MTP prefix); fill ``nxt`` with
        the inputs of the next layer (``None``: nothing follows)."""
        lw, adapter = self.lw, self.adapter
        load, bi = self._loader(i), i if build_index is None else build_index
        moe = i in self.moe or not isinstance(i, int)
        layer = lw.layer(bi, self._to(load())).to(self.device)   # loaded tensors are not kept: reread below
        rep: dict = {"layer": i, "moe": moe}
        if not moe:
            for j in range(len(hidden)):
                nxt.append(lw.run_layer(layer, bi, hidden[j], ctx(hidden[j])))
            del layer
            tensors = load()
            if any(adapter.is_expert_key(k) for k in tensors):
                tensors = adapter.convert_layout(tensors, self.opts.output_layout)
            self._save(i, tensors, rep)
            return rep
        # the block's weights are views of the built layer's own parameters: no second copy of the experts
        block = MoEBlock.from_tensors(adapter, self.config, adapter.layer_tensors(layer, "fused"), dtype=None)
        needs = set(self.method.NEEDS)
        seed = self.opts.seed + (i if isinstance(i, int) else self.model.num_layers)
        held = heldout_batches(len(hidden), holdout_fraction(self.method, self.mopts))
        heldout: list[torch.Tensor] = []
        stats = ExpertStats(block.num_experts, block.experts.gate.shape[2], block.experts.gate.shape[1],
                            len(hidden) - len(held), ObserveOptions(
                                activation_samples=self.opts.activation_samples if "activations" in needs else 0,
                                keep_logits="logits" in needs, seed=seed))
        # The original layer's outputs are needed only by a non-sequential pass; otherwise the forward stops at
        # the MoE block, and a sequential pass keeps the residual stream there for the compressed layer's pass.
        stop = self.sequential or nxt is None
        resid = (ActivationCache(self.work / f"r-{self._name(i)}", self.budget)
                 if self.sequential and nxt is not None else None)
        seen, handle = capture_moe_input(layer, adapter, stop=stop)
        try:
            for j in range(len(hidden)):
                h = hidden[j]
                if stop:
                    run_to_moe(lw.run_layer, layer, bi, h, ctx(h))
                    r, x = seen.pop()
                    if resid is not None:
                        resid.append(r)
                else:
                    nxt.append(lw.run_layer(layer, bi, h, ctx(h)))
                    x = seen.pop()
                if j in held:
                    heldout.append(heldout_rows(x.reshape(-1, x.shape[-1]), len(held), seed + j))
                else:
                    stats.observe(block, x.reshape(-1, x.shape[-1]))
                del h, x
        finally:
            handle.remove()
        if resid is not None:
            hidden.close()                    # the layer's inputs are not needed again: the residuals replace them
        release_memory()                      # the forward passes' freed blocks, before planning allocates
        mmap_threshold(1 << 20)
        try:
            plan = self.method.plan_layer(MethodInput(
                stats, block, self.keep, self.mopts, heldout=heldout,
                sequences=sum(len(b) for j, b in enumerate(self.batches) if j not in held),
                moe_inputs=lambda: self._replay(layer, bi, hidden, ctx, held, resid)))
        finally:
            mmap_threshold(32 << 20)          # the ceiling glibc's own adaptive threshold settles at
        summary = stats.summary_tensors()
        rep["tokens"] = stats.tokens
        rep["frequency"] = [int(v) for v in stats.freq.tolist()]
        del block, stats, layer, seen, heldout   # the original layer's weights (the block views them) go now
        release_memory()
        new_tensors = self._apply(load(), plan)
        rep.update(plan.to_json())
        save_safetensors(summary, self.work / f"stats-{self._name(i)}.safetensors")
        # the compressed layer on the same inputs: what its experts see (the statistics of the compressed model's
        # importance matrix) and, for a sequential pass, the next layer's inputs. The MoE block's input does not
        # change with the block, so a sequential pass computes it from the kept residual stream (attention is not
        # computed again); otherwise the forward stops at the MoE block.
        layer = lw.layer(bi, self._to(new_tensors)).to(self.device)
        block = MoEBlock.from_tensors(adapter, self.config, adapter.layer_tensors(layer, "fused"), dtype=None)
        out_stats = OutputStats(block.num_experts, block.experts.gate.shape[2], block.experts.gate.shape[1])
        seen, handle = capture_moe_input(layer, adapter, stop=resid is None)
        try:
            for j in range(len(resid) if resid is not None else len(hidden)):
                if resid is not None:
                    nxt.append(moe_tail(layer, adapter, resid[j]))
                    x = seen.pop()
                else:
                    run_to_moe(lw.run_layer, layer, bi, hidden[j], ctx(hidden[j]))
                    _, x = seen.pop()
                out_stats.observe(block, x.reshape(-1, x.shape[-1]))
                del x
        finally:
            handle.remove()
        del layer, block, seen
        if resid is not None:
            resid.close()
        save_safetensors(out_stats.summary_tensors(), self.work / f"ostats-{self._name(i)}.safetensors")
        self._save(i, new_tensors, rep)
        return rep

    @torch.no_grad()
    def _replay(self, layer, bi, hidden: ActivationCache, ctx, held: set[int], resid: ActivationCache | None):
        """The MoE inputs [T, H] of the observed batches again, one batch at a time: the MoE norm of the kept
        residual stream (a sequential pass), else a forward of the layer up to its MoE block."""
        norm = layer.get_submodule(MOE_NORM)
        seen, handle = capture_moe_input(layer, self.adapter, stop=True) if resid is None else ([], None)
        try:
            for j in range(len(resid) if resid is not None else len(hidden)):
                if j in held:
                    continue
                if resid is not None:
                    x = norm(resid[j])
                else:
                    run_to_moe(self.lw.run_layer, layer, bi, hidden[j], ctx(hidden[j]))
                    _, x = seen.pop()
                yield x.reshape(-1, x.shape[-1])
        finally:
            if handle is not None:
                handle.remove()

    def _from_saved(self, i, done: int, total: int) -> dict:
        """Plan and compress layer ``i`` from saved observations: no forward pass at all."""
        from .reuse import SavedStats

        t_layer = time.time()
        self.model.checkpoint.close()
        rep: dict = {"layer": i, "moe": i in self.moe or not isinstance(i, int), "reused_observations": True}
        tensors = self._loader(i)()
        if not rep["moe"]:
            if any(self.adapter.is_expert_key(k) for k in tensors):
                tensors = self.adapter.convert_layout(tensors, self.opts.output_layout)
            self._save(i, tensors, rep)
        else:
            key = f"layers.{i}." if isinstance(i, int) else i
            saved_layer = self.saved["layers"][str(i)]
            mine = {k[len(key):]: v for k, v in self.saved["tensors"].items() if k.startswith(key)}
            stats = SavedStats(mine, saved_layer["tokens"])
            save_safetensors(mine, self.work / f"stats-{self._name(i)}.safetensors")   # carried to the output
            plan = self.method.plan_layer(MethodInput(stats, None, self.keep, self.mopts,
                                                      sequences=self.saved["calibration"]["samples"]))
            rep["tokens"] = stats.tokens
            rep["frequency"] = [int(v) for v in stats.freq.tolist()]
            rep.update(plan.to_json())
            self._save(i, self._apply(tensors, plan), rep)
        rep["seconds"] = round(time.time() - t_layer, 3)
        self.progress({"layer": done, "layers": total, "tokens_per_s": 0.0,
                       "eta_s": (time.time() - self.t0) / done * (total - done)})
        return rep

    def _apply(self, tensors: dict[str, torch.Tensor], plan: LayerPlan) -> dict[str, torch.Tensor]:
        adapter = self.adapter
        layout = adapter.expert_layout(tensors)
        router = tensors[adapter.router_key(layout)]
        new_experts, new_router = apply_plan(plan, adapter.experts(tensors, stack=False), router, stack=False)
        return adapter.replace_experts(tensors, new_experts, new_router, self.opts.output_layout)

    def _save(self, i, tensors: dict[str, torch.Tensor], rep: dict) -> None:
        out_dtype = DTYPES[self.opts.output_dtype] if self.opts.output_dtype else None
        t = {k: (v.to(out_dtype) if out_dtype is not None and v.is_floating_point() else v)
             for k, v in tensors.items()}
        path = self.work / f"layer-{self._name(i)}.safetensors"
        with atomic_file(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(rep))
        with atomic_file(path) as tmp:              # written last: its presence marks the layer done
            save_safetensors(t, tmp)

    def report(self, layers: list[dict], key: str) -> dict:
        n = self.adapter.num_experts(self.config)
        return {"method": self.opts.method, "method_options": self.mopts, "experts_before": n,
                "experts_after": self.keep, "top_k": self.adapter.routing(self.config).top_k,
                "sequential": self.sequential, "calibration": {"mix": self.opts.calib, "samples": self.opts.samples,
                                                                "seq_len": self.opts.seq_len, "seed": self.opts.seed},
                "device": str(self.device), "seconds": round(time.time() - self.t0, 2), "key": key,
                "layers": layers}


class _Contexts:
    """Position embeddings and masks per batch shape (the last batch and MTP inputs differ)."""

    def __init__(self, lw: LayerwiseModel):
        self.lw, self.cache = lw, {}

    def __call__(self, h: torch.Tensor):
        key = tuple(h.shape[:2])
        if key not in self.cache:
            self.cache[key] = self.lw.context(h)
        return self.cache[key]
