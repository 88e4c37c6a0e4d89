"""Compression at scale: the statistics a method reads do not grow with the calibration set, and the plans on a
fixed model (the trained demo model; two random-weight zoo models for REAM) stay what they were pinned as."""

from __future__ import annotations

import pytest
import torch

from reamkit.compression import CompressOptions, compress
from reamkit.compression.methods import MethodInput, get_method, method_options
from reamkit.compression.observe import STAT_KEYS, ExpertStats, ObserveOptions
from reamkit.zoo import DEMO_MODEL

from .test_compress_methods import D, H, N, make_block, tokens

# Groups (members, centroid first) and kept experts of every layer of the demo model at 25 % fewer experts,
# calibrated on 16 x 128 tokens, recorded with the earlier implementation that kept every token's router logits.
PINNED = {
    ("ream", ()): [
        [[6, 3, 4, 11, 13], [0, 1, 2, 5, 6, 7, 8, 9, 10, 12, 14, 15]],
        [[14, 4, 10, 8, 1], [0, 2, 3, 5, 6, 7, 9, 11, 12, 13, 14, 15]],
        [[2, 1, 5, 8, 12], [0, 2, 3, 4, 6, 7, 9, 10, 11, 13, 14, 15]],
        [[5, 1, 9, 12, 4], [0, 2, 3, 5, 6, 7, 8, 10, 11, 13, 14, 15]]],
    ("ream", (("variant", "reference"),)): [
        [[12, 11, 13, 14, 4], [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 12, 15]],
        [[14, 4, 2, 10, 1], [0, 3, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15]],
        [[2, 10, 5, 8, 12], [0, 1, 2, 3, 4, 6, 7, 9, 11, 13, 14, 15]],
        [[5, 1, 9, 8, 4], [0, 2, 3, 5, 6, 7, 10, 11, 12, 13, 14, 15]]],
    ("m-smoe", ()): [
        [[1, 7, 15], [8, 14], [11, 12], [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 13]],
        [[1, 10], [2, 5, 7], [12, 0], [1, 2, 3, 4, 6, 8, 9, 11, 12, 13, 14, 15]],
        [[6, 7], [8, 3], [11, 1], [14, 10], [0, 2, 4, 5, 6, 8, 9, 11, 12, 13, 14, 15]],
        [[2, 8, 10], [9, 13], [14, 0], [1, 2, 3, 4, 5, 6, 7, 9, 11, 12, 14, 15]]],
}


def plans(result) -> list:
    """Per MoE layer of a compression's report: its groups' members (centroid first), then its kept experts."""
    return [[g["members"] for g in lay["groups"]] + [lay["kept"]] for lay in result.report["layers"] if lay["moe"]]


@pytest.mark.parametrize("method,options", list(PINNED))
def test_plans_on_the_demo_model_are_pinned(method, options, tmp_path):
    res = compress(DEMO_MODEL, tmp_path / "out", CompressOptions(method=method, ratio=0.25, samples=16, seq_len=128,
                                                                 batch_size=4, method_options=dict(options)))
    assert plans(res) == PINNED[(method, options)]


# REAM's groups (members, centroid first) and kept experts of every layer of two random-weight zoo models at 25 %
# fewer experts, calibrated on 8 x 64 tokens, as the layer pass gave them when they were pinned. A faster pass must
# plan exactly the same: every layer's groups depend on the merged layers before it (sequential).
PINNED_ZOO = {
    ("qwen3_next", "paper"): [
        [[2, 11, 3, 15, 0], [1, 2, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14]],
        [[12, 8, 4, 11, 13], [0, 1, 2, 3, 5, 6, 7, 9, 10, 12, 14, 15]],
        [[14, 2, 0, 5, 12], [1, 3, 4, 6, 7, 8, 9, 10, 11, 13, 14, 15]],
        [[11, 0, 3, 14, 15], [1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]],
    ("qwen3_next", "reference"): [
        [[2, 11, 8, 3, 0], [1, 2, 4, 5, 6, 7, 9, 10, 12, 13, 14, 15]],
        [[12, 4, 11, 2, 13], [0, 1, 3, 5, 6, 7, 8, 9, 10, 12, 14, 15]],
        [[1, 5, 7, 0, 12], [1, 2, 3, 4, 6, 8, 9, 10, 11, 13, 14, 15]],
        [[2, 7, 0, 3, 15], [1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14]]],
    ("qwen3_moe", "paper"): [
        [[11, 2, 4, 0, 15], [1, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]],
        [[6, 5, 8, 2, 7], [0, 1, 3, 4, 6, 9, 10, 11, 12, 13, 14, 15]],
        [[13, 11, 4, 3, 5], [0, 1, 2, 6, 7, 8, 9, 10, 12, 13, 14, 15]],
        [[3, 13, 10, 0, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 14, 15]]],
    ("qwen3_moe", "reference"): [
        [[11, 2, 4, 14, 15], [0, 1, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13]],
        [[6, 8, 12, 2, 7], [0, 1, 3, 4, 5, 6, 9, 10, 11, 13, 14, 15]],
        [[13, 4, 3, 11, 5], [0, 1, 2, 6, 7, 8, 9, 10, 12, 13, 14, 15]],
        [[3, 10, 2, 9, 6], [0, 1, 3, 4, 5, 7, 8, 11, 12, 13, 14, 15]]],
}


@pytest.mark.parametrize("family,variant", list(PINNED_ZOO))
def test_ream_plans_on_zoo_models_are_pinned(family, variant, tmp_path):
    from reamkit.zoo import build_cached

    res = compress(build_cached(family), tmp_path / "out", CompressOptions(
        method="ream", ratio=0.25, samples=8, seq_len=64, batch_size=4, method_options={"variant": variant}))
    assert plans(res) == PINNED_ZOO[(family, variant)]


def observed(block, x: torch.Tensor, batches: int, samples: int = 1024, outputs: bool = True) -> ExpertStats:
    st = ExpertStats(block.num_experts, x.shape[1], block.experts.gate.shape[1], batches,
                     ObserveOptions(activation_samples=samples, outputs=outputs))
    for chunk in x.chunk(batches):
        st.observe(block, chunk)
    return st


def statistic_sizes(st: ExpertStats) -> dict[str, int]:
    """Bytes of every accumulated statistic of ``st``."""
    tensors = {k: getattr(st, k) for k in STAT_KEYS}
    if st.logit_gram is not None:
        tensors["logit_gram"] = st.logit_gram
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    sizes["x_samples"] = st.x_samples.numel() * st.x_samples.element_size()
    sizes["neuron_products"] = sum(t.numel() * t.element_size() for p in st.neuron_products
                                   for t in (p.gram, p.sumsq))
    return sizes


@pytest.mark.parametrize("batches", [4, 200])
def test_no_statistic_grows_with_the_calibration_tokens(batches):
    """Doubling the tokens (same batch size, twice the batches) leaves every statistic's size unchanged; the
    sampled alignment inputs never exceed their budget, even with more batches than samples."""
    gen = torch.Generator().manual_seed(0)
    block = make_block(gen)
    x = tokens(gen, 8192)
    stats = []
    for xs, b in ((x[:4096], batches), (x, 2 * batches)):
        st = observed(block, xs, b, samples=128, outputs=False)
        st.ensure_outputs(range(block.num_experts), block, lambda xs=xs, b=b: iter(xs.chunk(b)), ([0], [1, 2]))
        stats.append(st)
    half, full = stats
    assert full.tokens == 2 * half.tokens
    assert statistic_sizes(half) == statistic_sizes(full)
    assert full.sampled == half.sampled <= 128
    assert set(statistic_sizes(full)) >= {"logit_gram", "gated_out_sum", "x_samples", "reap_sum"}
    assert statistic_sizes(full)["neuron_products"] > 0


@pytest.mark.parametrize("batches,cap", [(4, 128), (6, 1000), (300, 128)])
def test_sampled_inputs_are_the_batches_rows_at_their_sampled_positions(batches, cap):
    """The samples go into one buffer of at most ``cap`` rows, batch after batch: each batch's share of it is that
    batch's MoE input at the positions recorded for the batch (distinct positions, within the batch)."""
    gen = torch.Generator().manual_seed(2)
    block = make_block(gen)
    x = tokens(gen, 2400)
    st = observed(block, x, batches, samples=cap, outputs=False)
    xs = st.sampled_inputs()
    assert len(xs) == st.sampled <= min(cap, len(st.x_samples))
    start = 0
    for b, chunk in enumerate(x.chunk(batches)):
        pos = st._positions(b)
        assert len(set(pos.tolist())) == len(pos) and (pos < len(chunk)).all()
        assert torch.equal(xs[start:start + len(pos)], chunk[pos])
        start += len(pos)
    assert start == st.sampled and st._positions(batches) is None
    assert st.sampled == min(cap, max(1, cap // batches) * batches)


def test_logit_similarities_follow_exactly_from_the_gram_matrix():
    """REAM's logit-profile distance and M-SMoE's cosine, computed from every token's logits as the methods
    define them, equal what the accumulated Gram matrix gives."""
    from reamkit.compression.methods.ream import distance

    gen = torch.Generator().manual_seed(1)
    block = make_block(gen)
    x = tokens(gen, 2048)
    st = observed(block, x, 4)
    v = torch.nn.functional.normalize(block.router_logits(x).double().T, dim=-1)      # [N, T] profiles
    d = torch.cdist(v, v)
    assert torch.allclose(st.logit_cosine(), v @ v.T, atol=1e-12)
    opts = method_options("ream", {})
    mean = torch.nn.functional.normalize(st.gated_out_sum / st.tokens, dim=-1)
    by_hand = 1 - ((1 + mean @ mean.T) / 2 + (1 - d / d.max())) / 2
    by_hand.fill_diagonal_(0)
    assert torch.allclose(distance(MethodInput(st, block, 12, opts)), by_hand, atol=1e-9)


def test_sums_over_all_tokens_equal_the_dense_expert_outputs():
    """The output sums come from the hidden activations (W_down applied once per batch), the norms from the
    routed tokens only: both equal what the dense outputs of every expert on every token give."""
    gen = torch.Generator().manual_seed(2)
    block = make_block(gen)
    x = tokens(gen, 512)
    st = observed(block, x, 2)
    e = block.expert_down(block.expert_hidden(x))                              # [N, T, H]
    probs = torch.softmax(block.router_logits(x), -1)
    routed = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(2, -1).indices, True)
    assert torch.allclose(st.out_sum, e.sum(1).double(), rtol=1e-4, atol=1e-3)
    assert torch.allclose(st.gated_out_sum, torch.einsum("tn,nth->nh", probs, e).double(), rtol=1e-4, atol=1e-3)
    norms = e.norm(dim=-1).T                                                   # [T, N]
    assert torch.allclose(st.ean_sum, (norms * routed).sum(0).double(), rtol=1e-5)
    assert torch.allclose(st.paper_sum, (norms * probs * routed).sum(0).double(), rtol=1e-5)


def test_output_sums_asked_for_later_equal_those_observed_at_once():
    """Observed without the output sums, a layer's statistics gain them for the experts asked for, by replaying
    the batches: equal to those a full observation computes; the others stay out, of the saved file too."""
    from reamkit.compression.observe import OUTPUT_KEYS

    gen = torch.Generator().manual_seed(3)
    block = make_block(gen)
    chunks = tokens(gen, 2048).chunk(4)
    full = observed(block, torch.cat(chunks), 4)
    lazy = observed(block, torch.cat(chunks), 4, outputs=False)
    assert not lazy.has_outputs.any() and not lazy.gated_out_sum.any()
    assert not set(OUTPUT_KEYS) & set(lazy.summary_tensors()) and set(OUTPUT_KEYS) <= set(full.summary_tensors())
    for k in ("reap_sum", "paper_sum", "ean_sum", "ref_chunk_sum", "mid_sumsq", "freq", "logit_gram"):
        assert torch.allclose(getattr(lazy, k), getattr(full, k), rtol=1e-6, atol=1e-9), k
    with pytest.raises(RuntimeError, match="replayed"):
        lazy.ensure_outputs([1], block, lambda: iter(chunks[:3]))
    lazy.ensure_outputs([5, 1, 5], block, lambda: iter(chunks))
    assert lazy.has_outputs.nonzero().flatten().tolist() == [1, 5]
    for k in OUTPUT_KEYS:
        assert torch.allclose(getattr(lazy, k)[[1, 5]], getattr(full, k)[[1, 5]], rtol=1e-5, atol=1e-3), k
        assert not getattr(lazy, k)[[0, 2, 3, 4]].any()
    with pytest.raises(ValueError, match="cannot be replayed"):
        lazy.ensure_outputs([2], block, None)


@pytest.mark.parametrize("n,keep,group_size", [(16, 12, 16), (16, 12, 2), (32, 20, 4), (64, 48, 16), (16, 8, 0)])
def test_ream_groups_read_only_the_output_experts_distances(n, keep, group_size):
    """The pseudo-pruning groups depend on the distances of the dropped experts and of the centroids that take
    them only (:func:`output_experts`): with every other distance made arbitrary, the groups stay the same."""
    from reamkit.compression.methods.ream import output_experts, pseudo_groups

    gen = torch.Generator().manual_seed(n + keep + group_size)
    for _ in range(5):
        sal = torch.rand(n, generator=gen, dtype=torch.float64)
        d = torch.rand(n, n, generator=gen, dtype=torch.float64)
        d = (d + d.T) / 2
        d.fill_diagonal_(0)
        read = output_experts(sal, keep, group_size)
        other = torch.ones(n, dtype=torch.bool)
        other[read] = False
        noisy = d.clone()
        noisy[other] = torch.rand(int(other.sum()), n, generator=gen, dtype=torch.float64)
        noisy[:, other] = torch.rand(n, int(other.sum()), generator=gen, dtype=torch.float64)
        noisy.fill_diagonal_(0)
        assert pseudo_groups(sal, noisy, keep, group_size) == pseudo_groups(sal, d, keep, group_size)
        assert len(read) < n or group_size == 0


def test_ream_plans_the_same_from_output_sums_asked_for_later():
    """REAM on statistics observed without the output sums (they are computed for the experts its groups read)
    makes the plan a full observation gives: same groups, members, weights and neuron permutations."""
    from reamkit.compression.methods.ream import plan

    gen = torch.Generator().manual_seed(4)
    block = make_block(gen)
    chunks = tokens(gen, 2048).chunk(4)
    opts = method_options("ream", {"group_size": 2})
    plans = []
    for outputs in (True, False):
        st = observed(block, torch.cat(chunks), 4, samples=512, outputs=outputs)
        p = plan(MethodInput(st, block, 10, opts, moe_inputs=lambda: iter(chunks)))
        plans.append([(g.centroid, g.members, [round(w, 9) for w in g.weights], g.perms) for g in p.groups])
        assert outputs or 0 < int(st.has_outputs.sum()) < block.num_experts
        assert bool(st.neuron_products) != outputs     # the replay took the alignment's neuron products
    assert plans[0] == plans[1]


def test_neuron_distances_taken_in_the_replay_equal_those_of_the_activation_features():
    """The alignment's activation costs from the neuron products the output-sum replay takes equal the distances
    between the recomputed, normalised activation features (a dead neuron included); pairs whose experts are
    not replayed, or that do not fit ``pair_bytes``, are not taken, and the features give their costs."""
    from reamkit.compression.align import ActivationFeatures, feature_costs

    gen = torch.Generator().manual_seed(5)
    block = make_block(gen)
    block.experts.up[1][3] = 0                      # neuron 3 of expert 1 never fires: its unit vector is zero
    chunks = tokens(gen, 2048).chunk(4)
    st = observed(block, torch.cat(chunks), 4, samples=512, outputs=False)
    st.ensure_outputs([1, 2, 5, 6], block, lambda: iter(chunks), ([6, 1, 7], [2, 5, 9]))
    taken = [(c, j) for c in range(N) for j in range(N) if st.neuron_distance(c, j) is not None]
    assert taken == [(1, 2), (1, 5), (6, 2), (6, 5)]           # centroid x member, both replayed
    feats = ActivationFeatures(st, block)
    for c, j in taken:
        want = feature_costs(feats, c)(j)
        assert torch.allclose(st.neuron_distance(c, j), want, atol=2e-5), (c, j)
        assert torch.allclose(feats.costs_to(c)(j), want, atol=2e-5)
    assert torch.allclose(st.neuron_distance(1, 2)[3], torch.ones(D))
    assert st.neuron_distance(1, 9) is None and st.neuron_distance(2, 1) is None
    assert torch.equal(feats.costs_to(1)(9), feature_costs(feats, 1)(9))
    small = ExpertStats(block.num_experts, H, D, 4, ObserveOptions(activation_samples=512, outputs=False,
                                                                   pair_bytes=1 << 10))
    for chunk in chunks:
        small.observe(block, chunk)
    small.ensure_outputs([1, 2], block, lambda: iter(chunks), ([1], [2]))
    assert small.has_outputs[[1, 2]].all() and not small.neuron_products


def test_the_compressed_layers_pass_skips_attention_but_computes_the_same(zoo_path):
    """Stopping a decoder layer at its MoE block gives its MoE input and residual stream; the residual plus the
    MoE of the normed residual is exactly the layer's output."""
    from reamkit.compression.layerwise import LayerwiseModel
    from reamkit.models import open_model
    from reamkit.models.moe import capture_moe_input, moe_tail, run_to_moe

    model = open_model(zoo_path)
    lw = LayerwiseModel(model)
    h = torch.randn(2, 32, model.config["hidden_size"], generator=torch.Generator().manual_seed(3))
    ctx = lw.context(h)
    i = model.adapter.moe_layers(model.config)[-1]
    layer = lw.layer(i)
    full = lw.run_layer(layer, i, h, ctx)
    seen, handle = capture_moe_input(layer, model.adapter, stop=True)
    run_to_moe(lw.run_layer, layer, i, h, ctx)
    handle.remove()
    (resid, x), = seen
    with torch.no_grad():
        assert torch.equal(moe_tail(layer, model.adapter, resid), full)
        assert torch.equal(layer.post_attention_layernorm(resid), x)
