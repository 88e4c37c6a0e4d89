"""Compression methods on MoE blocks built for the purpose: planted structure, and the checks of the
REAM/REAP specification (permutation invariance, alignment recovery, saliency modes, group statistics).

The blocks are small (16 experts, hidden 64) and their structure is planted exactly, so every assertion
states what a correct method must do on them; each test fails when the method it covers is broken.
"""

from __future__ import annotations

import pytest
import torch

from reamkit.compression.align import align_group
from reamkit.compression.methods import MethodInput, get_method, method_options
from reamkit.compression.methods.ream import pseudo_groups
from reamkit.compression.observe import ExpertStats, ObserveOptions
from reamkit.compression.plan import apply_plan
from reamkit.models.base import Experts, Routing
from reamkit.models.moe import MoEBlock

H, D, N, K = 64, 32, 16, 2


def align(centroid: int, other: int, *feature_sets) -> list[int]:
    """The permutation of ``other``'s neurons onto the centroid's: :func:`align_group` for one pair."""
    return align_group(centroid, [other], *feature_sets)[0]


def make_block(gen: torch.Generator, n: int = N, shared: bool = True) -> MoEBlock:
    experts = Experts(torch.randn(n, D, H, generator=gen) * 0.3, torch.randn(n, D, H, generator=gen) * 0.3,
                      torch.randn(n, H, D, generator=gen) * 0.3)
    router = torch.randn(n, H, generator=gen)
    sh = {"gate": torch.randn(D, H, generator=gen) * 0.3, "up": torch.randn(D, H, generator=gen) * 0.3,
          "down": torch.randn(H, D, generator=gen) * 0.3} if shared else None
    return MoEBlock(router, experts, Routing(n, K, True), sh, torch.randn(1, H, generator=gen) if shared else None)


def tokens(gen: torch.Generator, t: int = 2048) -> torch.Tensor:
    """Calibration inputs whose feature 0 is a constant 1, so a router row can carry a bias in it."""
    x = torch.randn(t, H, generator=gen)
    x[:, 0] = 1.0
    return x


def observe(block: MoEBlock, x: torch.Tensor, batches: int = 4) -> ExpertStats:
    st = ExpertStats(block.num_experts, H, D, batches, ObserveOptions(activation_samples=1024))
    for chunk in x.chunk(batches):
        st.observe(block, chunk)
    return st


def compress_block(block: MoEBlock, x: torch.Tensor, method: str, keep: int, **opts) -> tuple[MoEBlock, object]:
    st = observe(block, x)
    plan = get_method(method).plan_layer(MethodInput(st, block, keep, method_options(method, opts), sequences=64))
    experts, router = apply_plan(plan, block.experts, block.router)
    return MoEBlock(router, experts, Routing(keep, K, True), block.shared, block.shared_gate), plan


def rel_error(a: MoEBlock, b: MoEBlock, x: torch.Tensor) -> float:
    ya, yb = a.forward(x), b.forward(x)
    return float((ya - yb).norm() / ya.norm())


def copy_expert(block: MoEBlock, dst: int, src: int, perm: torch.Tensor | None = None, noise: float = 0.0,
                gen: torch.Generator | None = None) -> None:
    e = block.experts
    g, u, d = e.gate[src].clone(), e.up[src].clone(), e.down[src].clone()
    if perm is not None:
        g, u, d = g[perm], u[perm], d[:, perm]
    if noise:
        g, u, d = (t + noise * torch.randn(t.shape, generator=gen) for t in (g, u, d))
    e.gate[dst], e.up[dst], e.down[dst] = g, u, d


# ---------------------------------------------------------------------- the MoE breakdown
def test_moe_block_pieces_add_up():
    """forward = sum of gated expert outputs over the top-k + the sigmoid-gated shared expert."""
    gen = torch.Generator().manual_seed(0)
    block, x = make_block(gen), tokens(gen, 64)
    y = block.forward(x)
    w, idx = block.routing.weights(block.router_logits(x))
    outs = block.expert_down(block.expert_hidden(x))
    manual = torch.stack([sum(w[t, j] * outs[idx[t, j], t] for j in range(K)) for t in range(64)])
    assert torch.allclose(y, manual + block.shared_term(x), atol=1e-5)
    assert not torch.allclose(block.shared_term(x), torch.zeros_like(x))


# ---------------------------------------------------------------------- planted structure
def test_exact_duplicates_merge_without_changing_the_output():
    """(a) experts 8..15 are exact copies of 0..7 that the router never picks; REAM merges each into its
    original (weights > 0 in the reference variant) and the layer's output does not change."""
    gen = torch.Generator().manual_seed(1)
    block, x = make_block(gen), tokens(gen)
    for j in range(8):
        copy_expert(block, 8 + j, j)
        block.router[8 + j] = block.router[j]
        block.router[8 + j, 0] -= 30.0                 # never in the top-k
    for variant in ("reference", "paper"):
        small, plan = compress_block(block, x, "ream", 8, variant=variant, group_size=2)
        assert plan.kept == list(range(8))
        assert sorted(tuple(sorted(g.members)) for g in plan.groups) == [(j, 8 + j) for j in range(8)]
        if variant == "reference":                     # zero saliency becomes positive: a real average
            assert all(min(g.weights) > 0 for g in plan.groups)
        assert rel_error(block, small, x) < 1e-5


@pytest.fixture(scope="module")
def permuted_copies():
    """Experts 8..15 are neuron-permuted copies of 0..7, routed now and then (bias -3 in the router)."""
    gen = torch.Generator().manual_seed(2)
    block, x = make_block(gen), tokens(gen)
    for j in range(8):
        copy_expert(block, 8 + j, j, perm=torch.randperm(D, generator=gen))
        block.router[8 + j] = block.router[j]
        block.router[8 + j, 0] -= 3.0
    return block, x


def test_alignment_makes_permuted_copies_mergeable(permuted_copies, figure):
    """(b) with alignment the merge recovers each original exactly (only the dropped router rows change
    the output); without it the merged experts mix unrelated neurons."""
    block, x = permuted_copies
    aligned, plan = compress_block(block, x, "ream", 8, group_size=2)
    unaligned, _ = compress_block(block, x, "ream", 8, group_size=2, align=False)
    assert sorted(tuple(sorted(g.members)) for g in plan.groups) == [(j, 8 + j) for j in range(8)]
    for g in plan.groups:
        assert 0 < g.weights[1] < g.weights[0]       # both routed; the original more salient
    for i in range(8):                               # the merged expert is the original, exactly
        assert torch.allclose(aligned.experts.gate[i], block.experts.gate[i], atol=1e-5)
    err_a, err_u = rel_error(block, aligned, x), rel_error(block, unaligned, x)
    figure(f"permuted copies: relative output change with alignment {err_a:.4f}, without {err_u:.4f}")
    assert err_a < 0.05 and err_u > 3 * err_a


@pytest.mark.parametrize("method", ["reap", "frequency"])
def test_never_routed_experts_are_pruned_without_change(method):
    """(c) experts the router never picks are exactly the ones pruned, and the output is unchanged."""
    gen = torch.Generator().manual_seed(3)
    block, x = make_block(gen), tokens(gen)
    dead = [1, 4, 6, 9, 11, 15]
    block.router[dead, 0] -= 40.0
    small, plan = compress_block(block, x, method, N - len(dead))
    assert plan.dropped == dead
    assert rel_error(block, small, x) < 1e-5


def test_near_duplicate_pairs_ream_beats_reap(figure):
    """(d) experts come in near-duplicate pairs that the router picks together; REAP keeps one of each
    pair (losing the other's share), REAM averages them by saliency -- close to what the pair computed."""
    gen = torch.Generator().manual_seed(4)
    block, x = make_block(gen), tokens(gen)
    block.router *= 10.0                               # peaked routing: each token's pair dominates
    for j in range(8):
        copy_expert(block, 8 + j, j, noise=0.08, gen=gen)
        block.router[8 + j] = block.router[j]
        block.router[8 + j, 0] -= 0.8                  # the copy gets the smaller share of the pair
    ream_small, plan = compress_block(block, x, "ream", 8, group_size=2)
    reap_small, reap_plan = compress_block(block, x, "reap", 8)
    assert reap_plan.kept == list(range(8))            # the more salient member of every pair
    e_ream, e_reap = rel_error(block, ream_small, x), rel_error(block, reap_small, x)
    figure(f"near-duplicate pairs: relative output error REAM {e_ream:.4f} vs REAP {e_reap:.4f}")
    assert e_ream < 0.5 * e_reap


@pytest.mark.parametrize("method", ["ream", "reap", "frequency", "hc-smoe", "m-smoe"])
def test_keeping_every_expert_is_the_identity(method):
    """(e) a target equal to the expert count changes nothing."""
    gen = torch.Generator().manual_seed(5)
    block, x = make_block(gen), tokens(gen)
    same, plan = compress_block(block, x, method, N)
    assert plan.kept == list(range(N)) and plan.dropped == []
    assert torch.equal(same.router, block.router)
    for a, b in ((same.experts.gate, block.experts.gate), (same.experts.down, block.experts.down)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["ream", "reap", "frequency", "hc-smoe", "m-smoe"])
def test_every_method_keeps_the_target_and_the_shared_expert(method):
    gen = torch.Generator().manual_seed(6)
    block, x = make_block(gen), tokens(gen)
    small, plan = compress_block(block, x, method, 12)
    assert small.num_experts == 12 == len(plan.kept) and plan.kept == sorted(plan.kept)
    assert torch.equal(small.router, block.router[plan.kept])      # surviving rows, unchanged, in order
    assert small.shared is block.shared and small.shared_gate is block.shared_gate
    err = rel_error(block, small, x)
    assert 0 < err < 1.0


# ---------------------------------------------------------------------- the specification's checks
def test_permutation_invariance():
    """Permuting an expert's neurons (rows of W_gate/W_up, columns of W_down) leaves its output unchanged."""
    gen = torch.Generator().manual_seed(7)
    block, x = make_block(gen), tokens(gen, 128)
    before = block.expert_down(block.expert_hidden(x))[3]
    perm = torch.randperm(D, generator=gen)
    copy_expert(block, 3, 3, perm=perm)
    after = block.expert_down(block.expert_hidden(x))[3]
    assert torch.allclose(before, after, atol=1e-5)


def test_alignment_recovers_a_known_permutation():
    gen = torch.Generator().manual_seed(8)
    block, x = make_block(gen), tokens(gen)
    perm = torch.randperm(D, generator=gen)
    copy_expert(block, 5, 2, perm=perm)
    from reamkit.compression.align import ActivationFeatures, PCAFeatures

    st = observe(block, x)
    feats = [ActivationFeatures(st, block), PCAFeatures(block.experts)]
    found = align(2, 5, *feats)
    # expert 5's neuron a is expert 2's neuron perm[a]; alignment must map 2's neuron perm[a] back to a
    assert [found[int(p)] for p in perm] == list(range(D))
    for one in feats:                                  # each cost alone recovers it too
        assert align(2, 5, one) == found


def test_activation_features_are_the_sampled_hidden_activations_per_neuron():
    """``ActivationFeatures[e]`` [D, S]: row a is expert e's neuron a over the sampled inputs, unit length."""
    from reamkit.compression.align import ActivationFeatures

    gen = torch.Generator().manual_seed(11)
    block, x = make_block(gen), tokens(gen)
    st = observe(block, x)
    xs = st.sampled_inputs()
    assert xs.shape == (1024, H)
    for e in (0, 5):
        h = block.expert_hidden(xs, torch.tensor([e]))[0]                       # [S, D]
        want = torch.nn.functional.normalize(h.T, dim=-1)
        got = ActivationFeatures(st, block)[e]
        assert got.shape == (D, 1024)
        assert torch.allclose(got, want, atol=1e-6)


def test_group_alignment_holds_one_member_at_a_time():
    """A group's centroid features are computed once, each member's once, and a member's are gone before the
    next member's are made (a feature is [D, S]: 64 MB per expert at Qwen3-Next scale)."""
    import weakref

    gen = torch.Generator().manual_seed(10)
    table = torch.randn(6, D, 16, generator=gen)

    class Counting:
        def __init__(self):
            self.calls, self.alive = [], []

        def __getitem__(self, e):
            assert all(ref() is None for ref in self.alive[1:]), "an earlier member's features are still held"
            t = table[e].clone()
            self.calls.append(e)
            self.alive.append(weakref.ref(t))
            return t

    fs = Counting()
    perms = align_group(0, [3, 1, 5], fs)
    assert fs.calls == [0, 3, 1, 5]
    assert perms == [align(0, j, table) for j in (3, 1, 5)]


def test_saliency_modes_match_hand_computation_and_rank_differently():
    """REAP's token mean of g*||E|| vs the released REAM code's per-chunk mean of p^2*||E||."""
    gen = torch.Generator().manual_seed(9)
    block = make_block(gen, n=4, shared=False)
    block.routing = Routing(4, 2, True)
    x = tokens(gen, 64)
    st = observe(block, x, batches=2)
    probs = torch.softmax(block.router_logits(x), -1)
    top = probs.topk(2, -1).indices
    routed = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top, True)
    gates = block.gates(block.router_logits(x))
    norms = block.expert_down(block.expert_hidden(x)).norm(dim=-1).T          # [T, N]
    for i in range(4):
        r = routed[:, i]
        assert st.saliency("reap")[i] == pytest.approx(float((gates[r, i] * norms[r, i]).mean()), rel=1e-5)
        assert st.saliency("paper")[i] == pytest.approx(float((probs[r, i] * norms[r, i]).mean()), rel=1e-5)
        chunk_means = [float((probs[c][routed[c][:, i], i] ** 2 * norms[c][routed[c][:, i], i]).mean())
                       for c in (slice(0, 32), slice(32, 64)) if routed[c][:, i].any()]
        assert st.saliency("reference", sequences=16)[i] == pytest.approx(sum(chunk_means) / 2, rel=1e-5)
    # and the modes rank the 16 experts of a random block differently (p^2 favours confidently routed experts)
    gen = torch.Generator().manual_seed(10)
    block, x = make_block(gen, shared=False), tokens(gen)
    st = observe(block, x)
    rank = {m: torch.argsort(st.saliency(m, sequences=64), descending=True).tolist()
            for m in ("reap", "paper", "reference", "frequency")}
    assert rank["reap"] != rank["reference"] and rank["paper"] != rank["reference"]
    assert rank["frequency"] != rank["reap"]


@pytest.mark.parametrize("n,keep,sizes", [(512, 384, [16] * 8 + [9]), (128, 96, [16, 16, 3])])
def test_pseudo_pruning_group_statistics(n, keep, sizes):
    gen = torch.Generator().manual_seed(11)
    sal = torch.rand(n, generator=gen, dtype=torch.float64)
    pts = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    dist = torch.cdist(pts, pts)
    groups = pseudo_groups(sal, dist, keep, 16)
    members = sorted(m for g in groups.values() for m in g)
    assert members == list(range(n)) and len(groups) == keep
    multi = sorted((len(g) for g in groups.values() if len(g) > 1), reverse=True)
    assert multi == sizes
    assert sum(len(g) - 1 for g in groups.values()) == n - keep
    assert sum(1 for g in groups.values() if len(g) == 1) == keep - len(sizes)
    top = torch.argsort(sal, descending=True)[:len(sizes)].tolist()   # the most salient centroids absorb
    assert sorted(c for c, g in groups.items() if len(g) > 1) == sorted(top)


def test_group_size_too_small_is_refused():
    from reamkit.errors import ReamkitError

    with pytest.raises(ReamkitError, match="group size"):
        pseudo_groups(torch.rand(16, dtype=torch.float64), torch.rand(16, 16, dtype=torch.float64), 4, 2)


def test_methods_are_deterministic():
    gen = torch.Generator().manual_seed(12)
    block, x = make_block(gen), tokens(gen)
    for method in ("ream", "hc-smoe", "m-smoe"):
        a, pa = compress_block(block, x, method, 10)
        b, pb = compress_block(block, x, method, 10)
        assert pa.to_json() == pb.to_json() and torch.equal(a.experts.gate, b.experts.gate)


def test_ream_without_merging_is_the_original_restricted_to_the_kept_experts():
    """--merging none: the layer computes exactly what the original computes when the dropped experts can
    never be chosen (their router logits at -inf); kept router rows unchanged and in order."""
    gen = torch.Generator().manual_seed(13)
    block, x = make_block(gen), tokens(gen, 256)
    small, plan = compress_block(block, x, "ream", 10, merging="none")
    assert all(len(g.members) == 1 for g in plan.groups) and len(plan.dropped) == 6
    assert torch.equal(small.router, block.router[plan.kept])
    masked = MoEBlock(block.router.clone(), block.experts, block.routing, block.shared, block.shared_gate)
    masked_logits = masked.router_logits(x)
    masked_logits[:, plan.dropped] = float("-inf")
    g = masked.gates(masked_logits)
    outs = block.expert_down(block.expert_hidden(x))
    expected = torch.einsum("tn,nth->th", g, outs) + block.shared_term(x)
    # float32 sums over 10 instead of 16 experts round differently: a tolerance relative to the outputs' scale
    # (up to ~60 here); a dropped expert still contributing would move outputs by O(1)
    assert torch.allclose(small.forward(x), expected, rtol=1e-5, atol=2e-6 * expected.abs().max().item())
