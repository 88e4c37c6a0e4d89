"""The steps of compressing one layer of the layer pass (:mod:`.layerpass`): observe, plan, apply, propagate.

A method composes them (:meth:`.methods.base.Method.compress_layer`); the pass saves what they made.

* :meth:`LayerSteps.observe`: run every calibration batch through the original layer, observing its MoE block
  (:class:`ExpertStats`); batches held out for a method that scores plans keep only their MoE inputs. With
  saved observations (:mod:`.reuse`) nothing runs: the statistics are read instead.
* :meth:`LayerSteps.plan`: the method's plan from the observations; then the original layer is freed.
* :meth:`LayerSteps.apply`: the layer's tensors, read again, with the plan applied.
* :meth:`LayerSteps.propagate`: run the batches through the *compressed* layer, recording what its experts see
  (:class:`OutputStats`) and, for a sequential pass, making the next layer's inputs (a non-sequential pass
  took them from the original layer while observing). Nothing runs with saved observations.

Memory: in a sequential pass the observing forward stops at the MoE block and keeps the residual stream there
(in place of the layer's inputs), so the compressed layer's pass computes only residual + MoE, not the
attention again; while the method plans, large blocks are mapped on their own (:mod:`.heap`)
and the freed heap is handed back before and after.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..checkpoint.writer import save_safetensors
from ..models.moe import MOE_NORM, MoEBlock, capture_moe_input, moe_tail, run_to_moe
from ..models.upcast import observing
from .cache import ActivationCache
from .candidates import heldout_batches, heldout_rows
from .heap import PLANNING, heap_mode, release_memory
from .methods.base import MethodInput
from .observe import ExpertStats, ObserveOptions, OutputStats


@dataclass
class Observed:
    """One MoE layer's observations, what its plan is made from."""
    stats: object                        # ExpertStats, or SavedStats read from an earlier run
    block: MoEBlock | None               # the original block (None: planning from saved observations)
    sequences: int                       # calibration sequences the statistics saw
    heldout: list | None = None          # MoE inputs [T, H] of the held-out batches
    moe_inputs: Callable | None = None   # replays the observed batches' MoE inputs

    def input(self, keep: int, options) -> MethodInput:
        return MethodInput(self.stats, self.block, keep, options, sequences=self.sequences, heldout=self.heldout,
                           moe_inputs=self.moe_inputs)

    def release(self) -> None:
        self.stats = self.block = self.heldout = self.moe_inputs = None


class LayerSteps:
    """The steps for layer ``i`` (a decoder index or an MTP prefix) of the pass ``run``: its inputs are
    ``hidden``, the next layer's are appended to ``nxt`` (``None``: nothing follows, or no calibration)."""

    def __init__(self, run, i, hidden: ActivationCache | None, nxt: ActivationCache | None, ctx,
                 build_index: int | None = None):
        self.run, self.i, self.hidden, self.nxt, self.ctx = run, i, hidden, nxt, ctx
        self.bi = i if build_index is None else build_index
        self.load = run._loader(i)
        self.moe = i in run.moe or not isinstance(i, int)
        self.keep = run.keep
        self.rep: dict = {"layer": i, "moe": self.moe}
        if run.saved is not None:
            self.rep["reused_observations"] = True
        self.tensors: dict[str, torch.Tensor] | None = None        # what the pass saves
        self.layer = self.resid = None

    def passthrough(self) -> None:
        """A layer without an MoE block: the batches pass through it; its tensors are kept as they are."""
        run = self.run
        if self.hidden is not None:
            layer = run.lw.layer(self.bi, run._to(self.load())).to(run.device)
            for j in range(len(self.hidden)):
                self.nxt.append(run.lw.run_layer(layer, self.bi, self.hidden[j], self.ctx(self.hidden[j])))
            del layer
        tensors = self.load()
        if any(run.adapter.is_expert_key(k) for k in tensors):
            tensors = run.adapter.convert_layout(tensors, run.opts.output_layout)
        self.tensors = tensors

    @torch.no_grad()
    def observe(self, needs: tuple[str, ...], holdout: float) -> Observed:
        """The MoE block's statistics (``needs``: the per-token ones to keep), ``holdout`` of the batches held out."""
        run, hidden, nxt, ctx, bi = self.run, self.hidden, self.nxt, self.ctx, self.bi
        if run.saved is not None:
            return self._read_saved()
        lw, adapter = run.lw, run.adapter
        layer = lw.layer(bi, run._to(self.load())).to(run.device)   # loaded tensors are not kept: reread to apply
        # the block's weights are views of the built layer's own parameters: no second copy of the experts
        block = MoEBlock.from_tensors(adapter, run.config, adapter.layer_tensors(layer, "fused"), dtype=None)
        seed = run.opts.seed + (self.i if isinstance(self.i, int) else run.model.num_layers)
        held = heldout_batches(len(hidden), holdout)
        heldout: list[torch.Tensor] = []
        stats = ExpertStats(block.num_experts, block.experts.gate.shape[2], block.experts.gate.shape[1],
                            len(hidden) - len(held), ObserveOptions(
                                activation_samples=run.opts.activation_samples if "activations" in needs else 0,
                                keep_logits="logits" in needs, outputs="outputs" in needs, seed=seed))
        # The original layer's outputs are needed only by a non-sequential pass; otherwise the forward stops at
        # the MoE block, and a sequential pass keeps the residual stream there for the compressed layer's pass.
        stop = run.sequential or nxt is None
        resid = (ActivationCache(run.work / f"r-{run._name(self.i)}", run.budget)
                 if run.sequential and nxt is not None else None)
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
        self.layer, self.resid = layer, resid
        return Observed(stats, block, sum(len(b) for j, b in enumerate(run.batches) if j not in held), heldout,
                        lambda: self._replay(layer, held, resid))

    def _read_saved(self) -> Observed:
        from .reuse import SavedStats

        saved, i = self.run.saved, self.i
        key = f"layers.{i}." if isinstance(i, int) else i
        mine = {k[len(key):]: v for k, v in saved["tensors"].items() if k.startswith(key)}
        save_safetensors(mine, self.run.work / f"stats-{self.run._name(i)}.safetensors")   # carried to the output
        return Observed(SavedStats(mine, saved["layers"][str(i)]["tokens"]), None, saved["calibration"]["samples"])

    def plan(self, method, options, observed: Observed):
        """The method's plan for the layer; the observations and the original layer are freed after."""
        release_memory()                      # the forward passes' freed blocks, before planning allocates
        with heap_mode(PLANNING):
            plan = method.plan_layer(observed.input(self.keep, options))
        stats = observed.stats
        if self.run.saved is None:            # (saved observations were copied as they were read)
            save_safetensors(stats.summary_tensors(), self.run.work / f"stats-{self.run._name(self.i)}.safetensors")
        self.rep["tokens"] = stats.tokens
        self.rep["frequency"] = [int(v) for v in stats.freq.tolist()]
        del stats
        observed.release()
        self.layer = None                     # the original layer's weights (the block views them) go now
        release_memory()
        return plan

    def apply(self, method, plan) -> dict[str, torch.Tensor]:
        """The layer's tensors, read again, with ``plan`` applied to its experts and router."""
        run = self.run
        self.tensors = method.apply(plan, self.load(), run.adapter, run.opts.output_layout)
        self.rep.update(plan.to_json())
        return self.tensors

    @torch.no_grad()
    def propagate(self, tensors: dict[str, torch.Tensor]) -> None:
        """The compressed layer on the same inputs: what its experts see (the statistics of the compressed model's
        importance matrix) and, for a sequential pass, the next layer's inputs. The MoE block's input does not
        change with the block, so a sequential pass computes it from the kept residual stream (attention is not
        computed again); otherwise the forward stops at the MoE block."""
        run, resid, hidden, adapter = self.run, self.resid, self.hidden, self.run.adapter
        if run.saved is not None:
            return
        layer = run.lw.layer(self.bi, run._to(tensors)).to(run.device)
        block = MoEBlock.from_tensors(adapter, run.config, adapter.layer_tensors(layer, "fused"), dtype=None)
        out_stats = OutputStats(block.num_experts, block.experts.gate.shape[2], block.experts.gate.shape[1])
        seen, handle = capture_moe_input(layer, adapter, stop=resid is None)
        # the layer's own forward evaluates every expert on its routed tokens: the statistics are taken from it
        # where its experts module lets an observer in, else computed again from the MoE inputs
        experts = layer.get_submodule(f"{adapter.moe}.experts")
        with observing(experts, out_stats.add) if resid is not None else nullcontext(False) as in_forward:
            try:
                for j in range(len(resid) if resid is not None else len(hidden)):
                    if resid is not None:
                        self.nxt.append(moe_tail(layer, adapter, resid[j]))
                        x = seen.pop()
                    else:
                        run_to_moe(run.lw.run_layer, layer, self.bi, hidden[j], self.ctx(hidden[j]))
                        _, x = seen.pop()
                    if not in_forward:
                        out_stats.observe(block, x.reshape(-1, x.shape[-1]))
                    del x
            finally:
                handle.remove()
        del layer, block, seen, experts
        if resid is not None:
            resid.close()
            self.resid = None
        save_safetensors(out_stats.summary_tensors(), run.work / f"ostats-{run._name(self.i)}.safetensors")

    @torch.no_grad()
    def _replay(self, layer, held: set[int], resid: ActivationCache | None):
        """The MoE inputs [T, H] of the observed batches again, one batch at a time: the MoE norm of the kept
        residual stream (a sequential pass), else a forward of the layer up to its MoE block."""
        norm = layer.get_submodule(MOE_NORM)
        seen, handle = capture_moe_input(layer, self.run.adapter, stop=True) if resid is None else ([], None)
        try:
            for j in range(len(resid) if resid is not None else len(self.hidden)):
                if j in held:
                    continue
                if resid is not None:
                    x = norm(resid[j])
                else:
                    run_to_moe(self.run.lw.run_layer, layer, self.bi, self.hidden[j], self.ctx(self.hidden[j]))
                    _, x = seen.pop()
                yield x.reshape(-1, x.shape[-1])
        finally:
            if handle is not None:
                handle.remove()
