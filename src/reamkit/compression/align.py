"""Neuron alignment for merging: find the permutation of expert j's D hidden neurons that lines them up
with the centroid's, by the Hungarian algorithm (scipy's ``linear_sum_assignment``).

A SwiGLU expert is unchanged when its hidden neurons are permuted (rows of W_gate and W_up, columns of
W_down, all by the same permutation), so two experts that compute similar functions may store them in
different neuron orders; averaging without aligning first mixes unrelated neurons.

Costs between neuron a of the centroid and neuron b of expert j (each an L2 distance of L2-normalised rows):
* activation cost: the neurons' activation vectors over the sampled calibration positions [D, S];
* weight cost: each neuron's concat(W_gate[a, :], W_up[a, :], W_down[:, a]) [3H], projected by one PCA per
  layer (rank 64, centred, fitted on all N * D rows) and normalised again.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..models.base import Experts


def weight_features(experts: Experts) -> torch.Tensor:
    """Per-neuron weight rows [N, D, 3H], L2-normalised."""
    feats = torch.cat([experts.gate.float(), experts.up.float(), experts.down.float().transpose(1, 2)], dim=-1)
    return F.normalize(feats, dim=-1)


def pca_features(feats: torch.Tensor, rank: int = 64, seed: int = 0) -> torch.Tensor:
    """Project [N, D, F] rows onto the top ``rank`` principal directions of all N * D rows (centred), then
    normalise each row again. Deterministic for a seed (randomised low-rank SVD)."""
    n, d, f = feats.shape
    rows = feats.reshape(n * d, f)
    q = min(rank, n * d, f)
    centred = rows - rows.mean(0, keepdim=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(centred, q=q, center=False, niter=4)
    return F.normalize(centred @ v, dim=-1).reshape(n, d, q)


def activation_features(acts: torch.Tensor) -> torch.Tensor:
    """Sampled activations [N, S, D] -> each neuron's activation vector [N, D, S], L2-normalised."""
    return F.normalize(acts.float().transpose(1, 2), dim=-1)


def align(centroid: int, other: int, *feature_sets: torch.Tensor) -> list[int]:
    """Permutation ``perm`` with ``other``'s neuron ``perm[a]`` matched to the centroid's neuron ``a``,
    minimising the summed distances over the given feature sets (each [N, D, F])."""
    from scipy.optimize import linear_sum_assignment

    cost = sum(torch.cdist(fs[centroid].double(), fs[other].double()) for fs in feature_sets)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    assert (rows == range(len(rows))).all()
    return [int(c) for c in cols]


def cosine_distance(a: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between the rows of ``a`` [N, F] (float64)."""
    u = F.normalize(a.double(), dim=-1)
    return 1 - u @ u.T
