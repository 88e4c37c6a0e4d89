"""Candidate plans for one layer, scored by the error they cause on held-out calibration sequences.

A candidate is written ``reap``, ``frequency``, ``hc-smoe``, ``m-smoe``, ``ream`` (its own group size) or
``ream:C`` -- REAM with group size C, where C may be ``n/8`` (an eighth of the layer's experts, at least 2).
Group sizes that cannot absorb the removed experts are skipped; sizes that give the same groups as a smaller
one (every C >= N - k + 1 puts all removed experts with the top centroid) are scored once.

The score of a plan is the relative squared error of the MoE block's output on the held-out inputs:
sum_x ||y(x) - y'(x)||^2 / sum_x ||y(x)||^2, with y the original block (router-weighted routed experts plus
the shared-expert term) and y' the compressed one on the same inputs x. The held-out inputs are the MoE
inputs of calibration batches that the statistics the plans are made from never saw (:mod:`.layerpass`),
at most :data:`HELDOUT_TOKENS` positions per layer.
"""

from __future__ import annotations

import time

import torch

from ..errors import ReamkitError
from ..models.base import Experts, Routing
from ..models.moe import MoEBlock
from .plan import LayerPlan, apply_plan

def parse(spec: str, num_experts: int, keep: int, ream_options) -> list[tuple[str, str, object]]:
    """``"reap,ream:2,ream:n/8"`` -> [(label, method, options)], infeasible and duplicate group sizes dropped.
    ``ream_options`` (options or a dict) give the REAM candidates their options other than the group size."""
    from .methods import get_method
    from .methods.ream import MergeOptions

    given = ream_options.model_dump() if hasattr(ream_options, "model_dump") else dict(ream_options)
    merge = {k: v for k, v in given.items() if k in MergeOptions.model_fields}
    out, sizes = [], set()
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, arg = item.partition(":")
        get_method(name)
        if name == "auto" or (name == "ream" and arg == "auto"):
            raise ReamkitError(f"candidate {item!r} would choose among candidates itself; name a method or ream:C")
        if name != "ream":
            if arg:
                raise ReamkitError(f"candidate {item!r}: only ream takes a group size (ream:C)")
            out.append((item, name, get_method(name).options()))
            continue
        opts = get_method("ream").options(merge)
        size = group_size(arg, num_experts) if arg else int(opts.group_size)
        effective = min(size, num_experts - keep + 1)         # larger groups than this take the same experts
        if keep * (size - 1) < num_experts - keep or effective in sizes:
            continue
        sizes.add(effective)
        out.append((f"ream:{size}", "ream", opts.model_copy(update={"group_size": size})))
    if not out:
        raise ReamkitError(f"no feasible candidate in {spec!r} for {num_experts} -> {keep} experts")
    return out


def group_size(arg: str, num_experts: int) -> int:
    arg = arg.lower().replace(" ", "")
    if arg.startswith("n/"):
        try:
            return max(2, num_experts // int(arg[2:]))
        except ValueError:
            pass
    elif arg.isdigit() and int(arg) >= 2:
        return int(arg)
    raise ReamkitError(f"group size {arg!r} must be an integer >= 2 or n/D (the layer's experts divided by D)")


def heldout_batches(n: int, fraction: float) -> set[int]:
    """Indices of the ``fraction`` of ``n`` batches held out, spread evenly (at least one, never all)."""
    if fraction <= 0 or n < 2:
        return set()
    held = {j for j in range(n) if int((j + 1) * fraction) > int(j * fraction)} or {n - 1}
    return held if len(held) < n else set(range(1, n, 2))


HELDOUT_TOKENS = 32768          # held-out MoE inputs kept per layer at most (268 MB at hidden size 2048)


def heldout_rows(x: torch.Tensor, batches: int, seed: int) -> torch.Tensor:
    """A copy of the held-out batch's MoE inputs [T, H], thinned to its share of :data:`HELDOUT_TOKENS`."""
    per = max(1, HELDOUT_TOKENS // max(1, batches))
    if x.shape[0] <= per:
        return x.clone()
    pos = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:per]
    return x[pos.to(x.device)].clone()


def compressed_block(block: MoEBlock, plan: LayerPlan) -> MoEBlock:
    experts, router = apply_plan(plan, block.experts, block.router, stack=True)
    keep = len(plan.groups)
    return MoEBlock(router, experts, Routing(keep, block.routing.top_k, block.routing.renormalize),
                    block.shared, block.shared_gate)


@torch.no_grad()
def block_output(block: MoEBlock, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The block's output [T, H] in float32, each expert evaluated only on the tokens routed to it."""
    outs = []
    for s in range(0, x.shape[0], chunk):
        xc = x[s:s + chunk].to(block.router.dtype)
        w, idx = block.routing.weights(block.router_logits(xc))
        y = block.shared_term(xc).float()
        for e in idx.unique().tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            one = Experts(block.experts.gate[e:e + 1], block.experts.up[e:e + 1], block.experts.down[e:e + 1])
            sub = MoEBlock(block.router, one, block.routing)
            ye = sub.expert_down(sub.expert_hidden(xc.index_select(0, tok)))[0].float()
            y.index_add_(0, tok, w[tok, slot, None] * ye)
        outs.append(y)
    return torch.cat(outs) if outs else torch.empty(0, block.router.shape[1])


class Scorer:
    """Relative squared output error of plans against the original block on held-out inputs."""

    def __init__(self, block: MoEBlock, heldout: list[torch.Tensor]):
        if not heldout:
            raise ReamkitError("choosing a plan by measured error needs held-out calibration batches; "
                               "give more calibration sequences (--samples) than one batch (--batch-size)")
        self.block, self.x = block, heldout
        self.ref = [block_output(block, x) for x in heldout]
        self.norm = float(sum((r.double() ** 2).sum() for r in self.ref))
        self.tokens = sum(x.shape[0] for x in heldout)

    def __call__(self, plan: LayerPlan) -> float:
        small = compressed_block(self.block, plan)
        err = sum(float(((block_output(small, x) - r).double() ** 2).sum()) for x, r in zip(self.x, self.ref))
        return err / max(self.norm, 1e-30)


def choose(inp, spec: str) -> LayerPlan:
    """Plan the layer with every candidate of ``spec``, score each on the held-out inputs, return the best
    (ties go to the earlier candidate) with the scores in its notes under ``auto``."""
    from .methods import MethodInput, get_method

    t0 = time.time()
    st = inp.stats
    scorer = Scorer(inp.block, inp.heldout or [])
    cache: dict = {}
    scores, best, chosen, seconds = {}, None, None, {}
    for label, name, opts in parse(spec, st.num_experts, inp.keep, inp.options):
        t = time.time()
        plan = get_method(name).plan_layer(MethodInput(st, inp.block, inp.keep, opts, sequences=inp.sequences,
                                                       cache=cache, moe_inputs=inp.moe_inputs))
        scores[label] = scorer(plan)
        seconds[label] = round(time.time() - t, 3)
        if best is None or scores[label] < scores[chosen]:
            best, chosen = plan, label
    assert best is not None
    best.notes["auto"] = {"choice": chosen, "scores": {k: float(f"{v:.6g}") for k, v in scores.items()},
                          "heldout_tokens": scorer.tokens, "seconds": round(time.time() - t0, 3),
                          "candidate_seconds": seconds}
    return best
