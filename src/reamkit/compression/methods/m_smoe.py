"""M-SMoE (MC-SMoE without its low-rank step): frequency centroids, router-logit grouping, weight matching.

The ``keep`` most frequently routed experts are centroids; every other expert joins the centroid whose router
logits over the calibration tokens are most similar (cosine, from the logits' Gram matrix). Before averaging (weights proportional to routed
token counts), each member's neurons are permuted to match the centroid's by weight matching (Hungarian on
the distances between normalised per-neuron weight rows).
"""

from __future__ import annotations

import torch

from ..align import WeightFeatures, align_group
from ..plan import Group, LayerPlan, top_k_indices
from .base import Method


class MSMoE(Method):
    name = "m-smoe"
    needs = ("logits",)

    def plan_layer(self, inp) -> LayerPlan:
        return plan(inp)


def plan(inp) -> LayerPlan:
    st = inp.stats
    freq = st.freq
    centroids = top_k_indices(freq, inp.keep).tolist()
    dist = 1 - st.logit_cosine()                                   # [N, N] over logit profiles
    groups = {c: [c] for c in centroids}
    others = [i for i in range(st.num_experts) if i not in groups]
    if others:
        nearest = dist[others][:, centroids].argmin(dim=1).tolist()
        for j, c in zip(others, nearest):
            groups[centroids[c]].append(j)
    wf = WeightFeatures(inp.block.experts)
    out = []
    for c in sorted(groups):
        members = groups[c]
        w = freq[members].double()
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(members))
        perms = [None] + align_group(c, members[1:], wf)
        out.append(Group(c, members, w.tolist(), perms))
    return LayerPlan(st.num_experts, out, [float(v) for v in freq])
