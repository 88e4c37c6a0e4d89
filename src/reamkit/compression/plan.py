"""What a method decides for one layer (a :class:`LayerPlan`), and how it is applied to the weights.

Every method -- pruning or merging -- ends in the same shape of decision: a list of groups, one per kept
expert. A group names the expert whose router row survives (its *centroid*), the members whose weights are
averaged into it, their weights (summing to 1), and for each member an optional permutation of its D hidden
neurons that aligns it to the centroid. Pruning is the special case where every group is a singleton.
Applying a plan never touches the shared expert, its gate, or anything outside the routed experts and router.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.base import Experts


@dataclass
class Group:
    centroid: int
    members: list[int]                          # centroid first
    weights: list[float]                        # same order, sum to 1
    perms: list[list[int] | None] = field(default_factory=list)   # per member; None = identity

    def to_json(self) -> dict:
        return {"centroid": self.centroid, "members": self.members,
                "weights": [round(w, 6) for w in self.weights]}


@dataclass
class LayerPlan:
    num_experts: int
    groups: list[Group]                         # sorted by centroid index (the router order kept)
    saliency: list[float] | None = None
    notes: dict = field(default_factory=dict)

    @property
    def kept(self) -> list[int]:
        return [g.centroid for g in self.groups]

    @property
    def dropped(self) -> list[int]:
        merged = {m for g in self.groups for m in g.members}
        return [i for i in range(self.num_experts) if i not in merged]

    def check(self) -> None:
        seen: set[int] = set()
        for g in self.groups:
            assert g.members[0] == g.centroid and abs(sum(g.weights) - 1) < 1e-6, g
            assert not seen & set(g.members), "an expert is in two groups"
            seen |= set(g.members)
        assert self.kept == sorted(self.kept), "groups must be in router order"

    def to_json(self) -> dict:
        return {"num_experts": self.num_experts, "kept": self.kept, "dropped": self.dropped,
                "groups": [g.to_json() for g in self.groups if len(g.members) > 1],
                "saliency": self.saliency, **self.notes}


def prune_plan(num_experts: int, keep: torch.Tensor | list[int], saliency: torch.Tensor | None = None) -> LayerPlan:
    """A plan that keeps exactly the experts ``keep`` (any order) and drops the rest."""
    kept = sorted(int(i) for i in keep)
    return LayerPlan(num_experts, [Group(i, [i], [1.0], [None]) for i in kept],
                     None if saliency is None else [float(v) for v in saliency])


def top_k_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores; ties go to the lower index (stable, deterministic)."""
    order = torch.sort(score.double(), descending=True, stable=True).indices
    return order[:k]


def apply_plan(plan: LayerPlan, experts: Experts, router: torch.Tensor,
               stack: bool = True) -> tuple[Experts, torch.Tensor]:
    """New (experts, router) for the plan; merges are computed in float32 and cast back. With ``stack=False``
    the experts come back as lists in which kept singletons are the input tensors themselves (no copy)."""
    plan.check()
    gate, up, down = [], [], []
    for g in plan.groups:
        if len(g.members) == 1:
            gate.append(experts.gate[g.centroid])
            up.append(experts.up[g.centroid])
            down.append(experts.down[g.centroid])
            continue
        acc_g = acc_u = acc_d = 0
        perms = g.perms or [None] * len(g.members)
        for m, w, p in zip(g.members, g.weights, perms):
            eg, eu, ed = experts.gate[m].float(), experts.up[m].float(), experts.down[m].float()
            if p is not None:
                idx = torch.as_tensor(p, device=eg.device)
                eg, eu, ed = eg[idx], eu[idx], ed[:, idx]
            acc_g, acc_u, acc_d = acc_g + w * eg, acc_u + w * eu, acc_d + w * ed
        c = g.centroid
        gate.append(acc_g.to(experts.gate[c].dtype))
        up.append(acc_u.to(experts.up[c].dtype))
        down.append(acc_d.to(experts.down[c].dtype))
    new = Experts(torch.stack(gate), torch.stack(up), torch.stack(down)) if stack else Experts(gate, up, down)
    return new, router[torch.as_tensor(plan.kept, device=router.device)].clone()
