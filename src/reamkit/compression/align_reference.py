"""The released REAM code's activation samples for neuron matching: drawn afresh for every expert.

The released code draws, in every calibration batch and for every expert in turn, a new random permutation of
the batch's positions and keeps that expert's hidden activations at the first ``per`` of them
(``per = activation_samples // batches``). Each expert's activation matrix is therefore measured on its own
positions, unlike the shared positions of :class:`.align.ActivationFeatures`. This re-runs the MoE inputs of
the planning batches once (``moe_inputs``, given by the layer pass) and keeps the activations of the experts
that are merged only -- [D, S] each, in float32 -- where the released code keeps them for all N experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from ..models.moe import MoEBlock
from .align import unit_rows_


def per_expert_samples(moe_inputs: Iterable[torch.Tensor], block: MoEBlock, experts: list[int], per: int,
                       seed: int = 0) -> dict[int, torch.Tensor]:
    """{expert: its hidden activations [S, D] at positions drawn afresh for it in every batch}. Draws are made
    for every expert 0..N-1 in order in each batch (as the released code does), kept for ``experts``."""
    gen = torch.Generator().manual_seed(seed)
    want = sorted(set(experts))
    parts: dict[int, list[torch.Tensor]] = {e: [] for e in want}
    for x in moe_inputs:
        t = x.shape[0]
        draws = [torch.randperm(t, generator=gen)[:min(per, t)] for _ in range(block.num_experts)]
        for e in want:
            h = block.expert_hidden(x[draws[e].to(x.device)].to(block.router.dtype), torch.tensor([e]))[0]
            parts[e].append(h.float().cpu())
    return {e: torch.cat(v) if v else torch.empty(0, block.experts.gate.shape[1]) for e, v in parts.items()}


class PerExpertActivationFeatures:
    """``feats[e]`` [D, S]: expert e's neurons over its own sampled positions, L2-normalised (released REAM)."""

    def __init__(self, moe_inputs: Callable[[], Iterable[torch.Tensor]], block: MoEBlock, experts: list[int],
                 per: int, seed: int = 0):
        self.acts = per_expert_samples(moe_inputs(), block, experts, per, seed)

    def __getitem__(self, e: int) -> torch.Tensor:
        return unit_rows_(self.acts[e].T.contiguous())
