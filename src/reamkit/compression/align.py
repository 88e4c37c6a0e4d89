"""Neuron alignment for merging: find the permutation of expert j's D hidden neurons that lines them up
with the centroid's, by the Hungarian algorithm (scipy's ``linear_sum_assignment``).

A SwiGLU expert is unchanged when its hidden neurons are permuted (rows of W_gate and W_up, columns of
W_down, all by the same permutation), so two experts that compute similar functions may store them in
different neuron orders; averaging without aligning first mixes unrelated neurons.

Costs between neuron a of the centroid and neuron b of expert j (each an L2 distance of L2-normalised rows):
* activation cost: the neurons' activation vectors over the sampled calibration positions [D, S];
* weight cost: each neuron's concat(W_gate[a, :], W_up[a, :], W_down[:, a]) [3H], projected onto the top 64
  principal directions of all N * D such rows (centred; randomised SVD) and normalised again.

Memory: the features are computed per expert when an alignment asks for them (:class:`ActivationFeatures`,
:class:`PCAFeatures`), a group's centroid's once and each other member's only while it is aligned, and only
merged experts are ever aligned; the PCA's randomised SVD streams the rows two experts at a time (holding the
N * D * 3H rows, twice with centring, would take 13 GB per layer at Qwen3-Next scale).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..models.base import Experts


def weight_features(experts: Experts, idx: slice | torch.Tensor = slice(None)) -> torch.Tensor:
    """Per-neuron weight rows [n, D, 3H] of the experts ``idx``, L2-normalised (float32)."""
    feats = torch.cat([experts.gate[idx].float(), experts.up[idx].float(),
                       experts.down[idx].float().transpose(1, 2)], dim=-1)
    return F.normalize(feats, dim=-1)


def _pca_basis(rows_of, n: int, rank: int, seed: int = 0, niter: int = 4, keep_bytes: int = 64 << 20
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean [F], the top ``rank`` principal directions [F, q] and their singular values [q] of the (centred)
    rows ``rows_of(slice)`` gives
    for experts 0..n-1: the randomised SVD of ``torch.pca_lowrank`` (same random start for a seed, ``niter``
    power iterations), computed with the rows streamed a few experts at a time instead of held at once (when all
    rows take at most ``keep_bytes`` they are computed once and kept, with the same arithmetic)."""
    step = 2                                         # experts per block: 2 * D * 3H floats at a time
    blocks = [slice(s, min(n, s + step)) for s in range(0, n, step)]
    kept: dict[int, torch.Tensor] = {}               # all blocks, when all rows fit ``keep_bytes``

    def rows(sl):
        if sl.start in kept:
            return kept[sl.start]
        r = rows_of(sl)
        r = r.reshape(-1, r.shape[-1]).float()
        if r.numel() * r.element_size() * n <= keep_bytes * (sl.stop - sl.start):
            kept[sl.start] = r
        return r

    total, acc = 0, None
    for sl in blocks:
        r = rows(sl)
        acc = r.sum(0) if acc is None else acc + r.sum(0)
        total += r.shape[0]
    mean = acc / total
    f = mean.numel()
    q = min(rank, total, f)

    def times(mat):                                  # (A - 1 mean^T) @ mat, [M, q]
        return torch.cat([rows(sl) @ mat for sl in blocks]) - (mean @ mat)[None]

    def t_times(mat):                                # (A - 1 mean^T)^T @ mat, [F, q]
        out, start = torch.zeros(f, mat.shape[1]), 0
        for sl in blocks:
            r = rows(sl)
            out += r.T @ mat[start:start + r.shape[0]]
            start += r.shape[0]
        return out - torch.outer(mean, mat.sum(0))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        start = torch.randn(f, q)
    basis = torch.linalg.qr(times(start)).Q
    for _ in range(niter):
        basis = torch.linalg.qr(times(torch.linalg.qr(t_times(basis)).Q)).Q
    _, sv, vh = torch.linalg.svd(t_times(basis).T, full_matrices=False)
    return mean.double(), vh.T.double(), sv.double()


class WeightFeatures:
    """:func:`weight_features` per expert on demand: ``feats[e]`` is [D, 3H]."""

    def __init__(self, experts: Experts):
        self.experts = experts

    def __getitem__(self, e: int) -> torch.Tensor:
        return weight_features(self.experts, slice(e, e + 1))[0]


class PCAFeatures:
    """Weight features projected by one PCA per layer, per expert on demand: ``feats[e]`` is [D, q].
    ``scaled=True`` projects onto the directions times their singular values, ``x @ (V * s)``, as the released
    REAM code does (so a coordinate grows as U * S^2, not U * S, before the rows are normalised)."""

    def __init__(self, experts: Experts, rank: int = 64, seed: int = 0, niter: int = 4, scaled: bool = False):
        self.experts = experts
        self.mean, self.basis, sv = _pca_basis(lambda sl: weight_features(experts, sl), len(experts.gate), rank,
                                               seed, niter)
        if scaled:
            self.basis = self.basis * sv[None]

    def __getitem__(self, e: int) -> torch.Tensor:
        rows = weight_features(self.experts, slice(e, e + 1))[0].double()
        return F.normalize((rows - self.mean) @ self.basis, dim=-1).float()


class ActivationFeatures:
    """Each neuron's activation vector over the sampled positions, per expert on demand: ``feats[e]`` is
    [D, S], L2-normalised. ``stats`` is the layer's :class:`ExpertStats` (it keeps the sampled inputs).
    As a cost (:meth:`costs_to`) a pair's distances come from the cross products the statistics took while
    replaying the MoE inputs, when they did (:meth:`ExpertStats.neuron_distance`); else from the features."""

    def __init__(self, stats, block=None):
        self.stats, self.block = stats, block

    def __getitem__(self, e: int) -> torch.Tensor:
        return unit_rows_(self.stats.neuron_activations(e, self.block))

    def costs_to(self, centroid: int):
        taken = getattr(self.stats, "neuron_distance", lambda c, j: None)
        fallback = None

        def cost(j: int) -> torch.Tensor:
            nonlocal fallback
            d = taken(centroid, j)
            if d is None:
                fallback = fallback or feature_costs(self, centroid)
                d = fallback(j)
            return d
        return cost


def unit_rows_(t: torch.Tensor) -> torch.Tensor:
    """``t`` [..., F] with every row scaled to unit L2 norm in place (an all-zero row stays zero), as
    ``F.normalize`` computes it."""
    return t.div_(torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min_(1e-12))


def euclidean(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise L2 distances between the rows of ``a`` [M, F] and ``b`` [K, F] in their own dtype (float32 for
    every feature here, as the released REAM code's ``torch.cdist``): sqrt(|a|^2 + |b|^2 - 2 a.b), the arithmetic
    of cdist's matrix-product path as one product (cdist itself takes 2-3 times longer on features [D, S] with
    S = 32768 activation samples). ``a_sq``: the rows' squared norms of ``a``, when known."""
    d = a @ b.T
    d.mul_(-2).add_((a.pow(2).sum(-1) if a_sq is None else a_sq)[:, None]).add_(b.pow(2).sum(-1)[None])
    return d.clamp_min_(0).sqrt_()


def feature_costs(feats, centroid: int):
    """j -> the distances [D, D] between the centroid's neuron features and expert j's (``feats[e]``: [D, F]),
    the centroid's computed once, now."""
    mine = feats[centroid]
    mine_sq = mine.pow(2).sum(-1)
    return lambda j: euclidean(mine, feats[j], mine_sq)


def align_group(centroid: int, others: list[int], *sources) -> list[list[int]]:
    """For each expert j of ``others``, the permutation ``perm`` with j's neuron ``perm[a]`` matched to the
    centroid's neuron ``a``, minimising the summed distances over the given sources: features indexable by
    expert ([D, F]) or anything with ``costs_to(centroid)`` (:class:`ActivationFeatures`). The centroid's
    features are computed once; each other expert's when its turn comes, and dropped after it (an activation
    feature is [D, S]: 64 MB per expert at Qwen3-Next scale)."""
    from scipy.optimize import linear_sum_assignment

    costs = [s.costs_to(centroid) if hasattr(s, "costs_to") else feature_costs(s, centroid) for s in sources]
    perms = []
    for j in others:
        cost = sum(c(j) for c in costs)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        assert (rows == range(len(rows))).all()
        perms.append([int(c) for c in cols])
    return perms
