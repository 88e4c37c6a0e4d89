"""REAP (Cerebras): prune the experts with the smallest router-weighted expert activation norm.

S_i = mean over the tokens routed to i of g_i(x) * ||E_i(x)||, where g_i is the gate the model applies
(the top-k weights renormalised when the model renormalises, as REAP does by default since 2026-03).
Keep the ``keep`` most salient experts per layer; their router rows survive unchanged, in original order.
Statistics come from the original model's activations (not sequential).
"""

from __future__ import annotations

from ..plan import LayerPlan, prune_plan, top_k_indices
from .base import Method


class Reap(Method):
    name = "reap"
    plans_from_saved = True          # saliency sums and routed counts: saved with every run's observations

    def plan_layer(self, inp) -> LayerPlan:
        s = inp.stats.saliency("reap")
        return prune_plan(inp.stats.num_experts, top_k_indices(s, inp.keep), s)
