"""Frequency pruning: keep the experts routed to the most calibration tokens (the REAP paper's baseline)."""

from __future__ import annotations

from ..plan import LayerPlan, prune_plan, top_k_indices

NAME = "frequency"
SEQUENTIAL = False
NEEDS: tuple[str, ...] = ()
DEFAULTS: dict = {}


def plan_layer(inp) -> LayerPlan:
    s = inp.stats.saliency("frequency")
    return prune_plan(inp.stats.num_experts, top_k_indices(s, inp.keep), s)
