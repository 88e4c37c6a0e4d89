"""REAM (Samsung SAIL Montreal): router-weighted expert activation merging.

Per layer: keep the ``keep`` most salient experts as centroids; visiting centroids from the most salient,
attach to each up to C-1 of its nearest still-unassigned non-centroids ("pseudo-pruning"); merge each group
into its centroid by a saliency-weighted average after aligning every member's neurons to the centroid's
(Hungarian, on activation + PCA'd weight costs); keep only the centroids' router rows, in original order.
Layers are processed in order and the next layer's statistics come from the merged layer (sequential).

Variants (``variant``):
* ``paper`` (default): saliency S_i = mean over tokens routed to i of p_i ||E_i|| (softmax over all experts,
  no renormalisation), padding masked; never-routed experts get weight 0.
* ``reference``: the released code's behaviour -- S_i = sum over chunks of 8 sequences of the chunk mean of
  p_i^2 ||E_i|| (outputs gated twice), divided by floor(sequences / 8); zeros replaced by
  min(0.5, smallest positive S). Its alignment too: weight features projected as ``x @ (V * s)`` by a
  randomised PCA with 2 power iterations, and activation samples drawn at fresh random positions for every
  expert in every batch (:mod:`..align_reference`; when the layer pass cannot replay the MoE inputs, as when
  planning from saved observations, the shared sampled positions are used). The paper variant keeps one
  shared set of positions (cheaper: computed on demand) and the unscaled projection with 4 iterations.

Distance: d = 1 - (s_out + s_gate) / 2 with s_out = (1 + cos(m_i, m_j)) / 2 on the mean gated outputs m_i
(plain mean outputs with ``gated_sim=False``) and s_gate = 1 - ||u_i - u_j|| / max, u_i expert i's router
logits over all calibration tokens, normalised (dropped with ``gate_output=False``); ||u_i - u_j|| follows
exactly from the logits' Gram matrix, accumulated batch by batch (:mod:`..observe`). The grouping reads the
distances of the dropped experts and of the centroids that take them only (:func:`output_experts`), so only
those experts' mean outputs are computed, each on every calibration token (the others' would cost as much and
never be read). With C > 0 they are exactly the experts that merge, so that run also gives the alignment's
activation costs for every centroid x member pair that may merge (:class:`..observe.NeuronProducts`, when
they fit ``pair_bytes``; otherwise the merged experts run again on the sampled inputs).
``align=False`` skips the neuron alignment (an ablation: it shows what the Hungarian step is for).
``group_size="auto"`` chooses C per layer among 2, 4, 8, N/8 and 16 by the error each causes on held-out
calibration batches (:mod:`..candidates`, as the ``auto`` method does with pruning among the candidates).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from ... import defaults
from ...errors import ReamkitError
from ..align import ActivationFeatures, PCAFeatures, align_group
from ..align_reference import PerExpertActivationFeatures
from ..observe import fill_zero_saliency
from ..plan import Group, LayerPlan, top_k_indices
from .base import Method, MethodOptions

AUTO_SIZES = "ream:2,ream:4,ream:8,ream:n/8,ream:16"


class MergeOptions(MethodOptions):
    """REAM's options but the group size (the ``auto`` method's merging candidates take them too)."""

    variant: Literal["paper", "reference"] = "paper"
    merging: Literal["logits+weights", "weights", "logits", "avg", "none"] = "logits+weights"
    gated_sim: bool = True
    gate_output: bool = True
    saliency: Literal["reap", "freq"] = "reap"
    pca_dim: int = Field(64, ge=1)
    seed: int = 0
    align: bool = True


class ReamOptions(MergeOptions):
    group_size: int | Literal["auto"] = 16

    @field_validator("group_size", mode="before")
    @classmethod
    def _whole_or_auto(cls, v):
        s = str(v).strip()
        if s == "auto":
            return s
        if isinstance(v, bool) or not s.isdigit():
            raise ValueError(f"REAM group size {v!r} must be a whole number (0: nearest centroid) or auto")
        return int(s)


class Ream(Method):
    name = "ream"
    sequential = True
    needs = ("logits", "activations")
    Options = ReamOptions

    def holdout(self, options) -> float:
        return defaults.AUTO_HOLDOUT if options.group_size == "auto" else 0.0

    def plan_layer(self, inp) -> LayerPlan:
        return plan(inp)


def saliency(inp) -> torch.Tensor:
    opts = inp.options
    if opts.saliency == "freq":
        return inp.stats.saliency("frequency")
    if opts.variant == "reference":
        return fill_zero_saliency(inp.stats.saliency("reference", sequences=inp.sequences))
    return inp.stats.saliency("paper")


def takers(sal: torch.Tensor, keep: int, group_size: int) -> tuple[list[int], list[int]]:
    """(the centroids that may take members, the non-centroids) of :func:`pseudo_groups`: the first
    ceil(F / (C - 1)) centroids by saliency, F the non-centroids, since each takes C - 1 until none is left;
    every centroid when each non-centroid joins its nearest (C = 0)."""
    centroids = top_k_indices(sal, keep).tolist()
    others = sorted(set(range(sal.numel())) - set(centroids))
    if not others:
        return [], []
    return (centroids if group_size <= 0 else centroids[:-(-len(others) // max(1, group_size - 1))]), others


def output_experts(sal: torch.Tensor, keep: int, group_size: int) -> list[int]:
    """The experts whose mean outputs :func:`pseudo_groups` reads: every non-centroid, and the centroids that take
    members (:func:`takers`)."""
    picking, others = takers(sal, keep, group_size)
    return sorted(others + picking)


def distance(inp, experts: list[int] | None = None, pairs=None) -> torch.Tensor:
    """Pairwise expert distance [N, N] (float64), 0 on the diagonal. With ``experts``, only the rows and columns
    of those experts are computed (their mean outputs evaluated now if the observation left them out, taking
    the neuron products of ``pairs`` on the way: :meth:`..observe.ExpertStats.ensure_outputs`); the others are
    +inf."""
    st, opts = inp.stats, inp.options
    n = st.num_experts
    if hasattr(st, "ensure_outputs"):
        st.ensure_outputs(range(n) if experts is None else experts, inp.block, inp.moe_inputs, pairs)
    mean = (st.gated_out_sum if opts.gated_sim else st.out_sum) / max(1, st.tokens)
    u = torch.nn.functional.normalize(mean.double(), dim=-1)
    s = (1 + u @ u.T) / 2
    if opts.gate_output:
        d = logit_profile_distance(st)
        s = (s + (1 - d / d.max().clamp(min=1e-12))) / 2
    dist = 1 - s
    if experts is not None:
        missing = torch.ones(n, dtype=torch.bool)
        missing[list(experts)] = False
        dist[missing] = torch.inf
        dist[:, missing] = torch.inf
    dist.fill_diagonal_(0)
    return dist


def logit_profile_distance(stats) -> torch.Tensor:
    """||u_i - u_j|| [N, N] for the normalised logit profiles u_i = v_i / ||v_i||: sqrt(2 - 2 cos(v_i, v_j)), the
    cosine from the logits' Gram matrix (:meth:`ExpertStats.logit_cosine`); 0 on the diagonal."""
    d = (2 - 2 * stats.logit_cosine()).clamp(min=0).sqrt()
    d.fill_diagonal_(0)
    return d


def pseudo_groups(sal: torch.Tensor, dist: torch.Tensor, keep: int, group_size: int) -> dict[int, list[int]]:
    """Centroids = the ``keep`` most salient experts. With ``group_size`` C > 0, each centroid (most salient
    first) takes its nearest unassigned non-centroids until it has C members; with C = 0 every non-centroid
    joins its nearest centroid (MC-SMoE assignment). Returns {centroid: [centroid, members...]}."""
    n = sal.numel()
    centroids = top_k_indices(sal, keep).tolist()
    if group_size > 0 and keep * (group_size - 1) < n - keep:
        raise ReamkitError(f"group size {group_size} cannot absorb {n - keep} experts into {keep} groups; "
                           f"use a group size of at least {-(-(n - keep) // keep) + 1}")
    groups = {c: [c] for c in centroids}
    free = torch.ones(n, dtype=torch.bool)
    free[centroids] = False
    if group_size == 0:
        others = free.nonzero().flatten()
        if others.numel():
            nearest = dist[others][:, centroids].argmin(dim=1)
            for j, c in zip(others.tolist(), nearest.tolist()):
                groups[centroids[c]].append(j)
        return groups
    for c in centroids:
        if not free.any():
            break
        order = torch.sort(dist[c], stable=True).indices
        take = order[free[order]][: group_size - 1]
        groups[c].extend(take.tolist())
        free[take] = False
    return groups


def plan(inp) -> LayerPlan:
    opts = inp.options
    if opts.group_size == "auto":
        from ..candidates import choose

        return choose(inp, AUTO_SIZES)
    cache = inp.cache if inp.cache is not None else {}     # shared by candidate plans of one layer (auto)
    key = (opts.variant, opts.saliency, opts.gated_sim, opts.gate_output)
    if ("sal", key) not in cache:
        cache[("sal", key)] = saliency(inp)
    sal = cache[("sal", key)]
    merging = opts.merging
    reference = opts.variant == "reference"
    per_expert = reference and inp.moe_inputs is not None      # the released code's own activation positions
    picking, others = takers(sal, inp.keep, int(opts.group_size))
    shared_positions = opts.align and merging in ("logits+weights", "logits") and not per_expert
    dist = distance(inp, sorted(others + picking), (picking, others) if shared_positions else None)
    groups = pseudo_groups(sal, dist, inp.keep, int(opts.group_size))
    feats: list = []                          # alignment costs (per expert, computed on demand); none with
    merges = any(len(m) > 1 for m in groups.values()) and merging != "none"     # align=False (unaligned average)
    if opts.align and merges and merging in ("logits+weights", "logits"):
        if per_expert:
            merged = sorted(m for ms in groups.values() if len(ms) > 1 for m in ms)
            key = ("act-per-expert", tuple(merged))
            if key not in cache:
                per = max(1, inp.stats.options.activation_samples // max(1, inp.stats.batches))
                cache[key] = PerExpertActivationFeatures(inp.moe_inputs, inp.block, merged, per, int(opts.seed))
            feats.append(cache[key])
        else:
            feats.append(cache.setdefault(("act",), ActivationFeatures(inp.stats, inp.block)))
    if opts.align and merges and merging in ("logits+weights", "weights"):
        key = ("pca", reference, int(opts.pca_dim), int(opts.seed))
        if key not in cache:
            cache[key] = PCAFeatures(inp.block.experts, int(opts.pca_dim), int(opts.seed),
                                     niter=2 if reference else 4, scaled=reference)
        feats.append(cache[key])
    perm_cache = cache.setdefault(("perms", opts.variant, merging, bool(opts.align)), {})
    out = []
    for c in sorted(groups):
        members = groups[c] if merging != "none" else [c]
        if len(members) == 1:
            out.append(Group(c, [c], [1.0], [None]))
            continue
        w = sal[members].double()
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(members))
        if merging == "avg":
            w = torch.full_like(w, 1 / len(members))
        todo = [j for j in members[1:] if (c, j) not in perm_cache]
        for j, p in zip(todo, align_group(c, todo, *feats) if feats and todo else [None] * len(todo)):
            perm_cache[(c, j)] = p
        perms = [None] + [perm_cache[(c, j)] for j in members[1:]]
        out.append(Group(c, members, w.tolist(), perms))
    sizes = sorted((len(m) for m in groups.values()), reverse=True)
    return LayerPlan(inp.stats.num_experts, out, [float(v) for v in sal],
                     {"group_sizes": [s for s in sizes if s > 1], "singletons": sizes.count(1)})
