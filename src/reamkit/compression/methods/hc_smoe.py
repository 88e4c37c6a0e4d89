"""HC-SMoE: hierarchical clustering of experts by their outputs, then frequency-weighted averaging.

Each expert is described by its mean output over **all** calibration tokens (its "characteristic
activation"); average-linkage agglomerative clustering on Euclidean distance cuts them into exactly ``keep``
clusters (scipy). Each cluster's weights are averaged with weights proportional to routed token counts, with no
neuron alignment. The router row kept for a cluster is that of its member nearest the cluster mean.
"""

from __future__ import annotations

import torch

from ..plan import Group, LayerPlan
from .base import Method


def clusters(features: torch.Tensor, k: int) -> list[list[int]]:
    from scipy.cluster.hierarchy import cut_tree, linkage

    n = features.shape[0]
    if k >= n:
        return [[i] for i in range(n)]
    z = linkage(features.double().cpu().numpy(), method="average", metric="euclidean")
    labels = cut_tree(z, n_clusters=k).flatten().tolist()
    out: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        out.setdefault(lab, []).append(i)
    return list(out.values())


class HCSMoE(Method):
    name = "hc-smoe"
    needs = ("outputs",)             # every expert's mean output over all tokens

    def plan_layer(self, inp) -> LayerPlan:
        return plan(inp)


def plan(inp) -> LayerPlan:
    st = inp.stats
    feats = st.out_sum / max(1, st.tokens)
    freq = st.freq
    groups = []
    for members in clusters(feats, inp.keep):
        mean = feats[members].mean(0)
        rep = members[int(torch.cdist(feats[members].double(), mean[None].double()).argmin())]
        members = [rep] + [m for m in members if m != rep]
        w = freq[members].double()
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(members))
        groups.append(Group(rep, members, w.tolist(), [None] * len(members)))
    groups.sort(key=lambda g: g.centroid)
    return LayerPlan(st.num_experts, groups, [float(v) for v in freq])
