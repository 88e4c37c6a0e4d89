"""The walk over the decoder layers (and Qwen3-Next's MTP layer), one layer in memory at a time.

For each decoder layer: load it alone and let the method compose the steps of :mod:`.steps` -- observe its MoE
block on every calibration batch (:class:`ExpertStats`), free the built layer, plan, re-read the layer's tensors
and apply the plan, propagate: run the batches through the *compressed* layer, recording what its experts see
(:class:`OutputStats`, the compressed model's importance matrix) and, for sequential methods (REAM), making the
next layer's inputs (pruning methods use the original layer's outputs, which the observing pass already
produced); then save. After the last decoder layer, an MTP block is calibrated on its real inputs (:mod:`.mtp`)
and compressed the same way. With saved observations (:mod:`.reuse`) no calibration runs: the observe step
reads them and nothing is propagated.
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
system (:mod:`.heap`), and the rest of the freed heap is handed back after the forward passes and after each layer.
"""

from __future__ import annotations

import gc
import json
import time

import torch
from safetensors.torch import load_file

from ..checkpoint.writer import save_safetensors
from ..fsutil import atomic_file
from .cache import ActivationCache
from .heap import release_memory
from .layerwise import LayerwiseModel
from .steps import LayerSteps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        # The objects that exist now (imported modules: transformers alone makes hundreds of thousands) live as
        # long as the pass: frozen, the collections between layers (:func:`release_memory`) skip them, 0.2 s each.
        gc.freeze()
        try:
            return self._all_layers()
        finally:
            gc.unfreeze()

    def _all_layers(self) -> list[dict]:
        lw, n_layers = self.lw, self.model.num_layers
        total = n_layers + len(self.mtp)
        if self.saved is not None:                      # planned from saved observations: no forward at all
            return [self._timed((n + 1, total, 0), self._layer, i, None, None, None)
                    for n, i in enumerate([*range(n_layers), *self.mtp])]
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
            nxt = ActivationCache(self.work / f"h-{i:05d}", self.budget)
            done = self.work / f"layer-{i:05d}.safetensors"
            step = self._replayed if done.is_file() else self._layer     # resumed: replay the finished layer
            reports.append(self._timed((i + 1, total, tokens), step, i, hidden, nxt, ctx))
            hidden.close()
            hidden = nxt
        for n, prefix in enumerate(self.mtp):
            reports.append(self._timed((n_layers + n + 1, total, tokens), self._mtp, prefix, hidden, ctx))
        hidden.close()
        return reports

    @torch.no_grad()
    def _replayed(self, i: int, hidden: ActivationCache, nxt: ActivationCache, ctx) -> dict:
        """A layer a killed run finished: its inputs for the next layer again, by a forward of the saved layer
        (sequential) or of the original one."""
        rep = json.loads((self.work / f"layer-{i:05d}.json").read_text())
        tensors = load_file(str(self.work / f"layer-{i:05d}.safetensors"))
        src = tensors if self.sequential else self.model.checkpoint.load_layer(i)
        layer = self.lw.layer(i, self._to(src)).to(self.device)
        del tensors, src
        for j in range(len(hidden)):
            nxt.append(self.lw.run_layer(layer, i, hidden[j], ctx(hidden[j])))
        return {**rep, "resumed": True}

    def _timed(self, progress: tuple[int, int, int], work, *args) -> dict:
        """``work(*args)``, a layer's report, with its seconds; then the progress (layers done, total, tokens)."""
        # Unmap the shards between layers: memory-mapped pages a layer touched would otherwise stay resident,
        # and the process would grow to the checkpoint's size.
        self.model.checkpoint.close()
        release_memory()
        t_layer = time.time()
        rep = work(*args)
        rep["seconds"] = round(time.time() - t_layer, 3)
        self._progress(*progress)
        return rep

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
    def _layer(self, i, hidden: ActivationCache | None, nxt: ActivationCache | None, ctx,
               build_index: int | None = None) -> dict:
        """Compress and save one layer (``i``: decoder index or MTP prefix) by the method's composition of the
        steps (:mod:`.steps`); fill ``nxt`` with the inputs of the next layer (``None``: nothing follows)."""
        steps = LayerSteps(self, i, hidden, nxt, ctx, build_index)
        if steps.moe:
            self.method.compress_layer(steps, self.mopts)
        else:
            steps.passthrough()
        assert steps.tensors is not None, f"method {self.method.name} applied no plan to layer {i}"
        self._save(i, steps.tensors, steps.rep)
        return steps.rep

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
        return {"method": self.opts.method, "method_options": self.mopts.model_dump(), "experts_before": n,
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
