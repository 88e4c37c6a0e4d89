"""Frequency pruning: keep the experts routed to the most calibration tokens (the REAP paper's baseline)."""

from __future__ import annotations

from ..plan import LayerPlan, prune_plan, top_k_indices
from .base import Method


class Frequency(Method):
    name = "frequency"
    plans_from_saved = True          # routed counts: saved with every run's observations

    def plan_layer(self, inp) -> LayerPlan:
        s = inp.stats.saliency("frequency")
        return prune_plan(inp.stats.num_experts, top_k_indices(s, inp.keep), s)
