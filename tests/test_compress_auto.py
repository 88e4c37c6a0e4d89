"""Choosing each layer's plan by measured error (``auto``, REAM ``group_size="auto"``), and the REAM
reference variant's alignment against an independent re-implementation of the released code's.

Blocks are the small planted ones of :mod:`tests.test_compress_methods`; the pass test runs a zoo model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from reamkit.compression import CompressOptions, compress
from reamkit.compression.candidates import HELDOUT_TOKENS, Scorer, block_output, heldout_batches, heldout_rows, parse
from reamkit.compression.methods import MethodInput, get_method, method_options
from reamkit.errors import ReamkitError
from reamkit.report.card import _layer_plan_lines, compression_facts

from .test_compress_methods import D, N, copy_expert, make_block, observe, tokens


def near_duplicate_block(gen: torch.Generator):
    """Experts come in near-duplicate pairs the router picks together (merging recovers the pair)."""
    block = make_block(gen)
    block.router *= 10.0
    for j in range(8):
        copy_expert(block, 8 + j, j, perm=torch.randperm(D, generator=gen), noise=0.08, gen=gen)
        block.router[8 + j] = block.router[j]
        block.router[8 + j, 0] -= 0.8
    return block


def plan_auto(block, x, keep=8, **opts):
    st = observe(block, x[:3072], batches=3)
    inp = MethodInput(st, block, keep, method_options("auto", opts), sequences=48, heldout=[x[3072:]])
    return get_method("auto").plan_layer(inp)


def test_auto_merges_near_duplicates_and_prunes_unrelated_experts(figure):
    """Layers of the planted model: two hold near-duplicate pairs, two hold unrelated random experts. auto
    merges in the first kind (REAM, 2 per group) and prunes in the second, and its scores say why."""
    gen = torch.Generator().manual_seed(11)
    layers = [("duplicates", near_duplicate_block(gen)), ("unrelated", make_block(gen)),
              ("duplicates", near_duplicate_block(gen)), ("unrelated", make_block(gen))]
    for kind, block in layers:
        x = tokens(gen, 4096)
        plan = plan_auto(block, x)
        a = plan.notes["auto"]
        figure(f"auto on {kind}: {a['choice']} ({', '.join(f'{k} {v:.4f}' for k, v in a['scores'].items())})")
        assert a["heldout_tokens"] == 1024 and set(a["scores"]) >= {"reap", "ream:2", "ream:4"}
        assert a["scores"][a["choice"]] == min(a["scores"].values())
        if kind == "duplicates":
            assert a["choice"].startswith("ream") and plan.dropped == [] and len(plan.groups) == 8
            assert a["scores"][a["choice"]] < 0.5 * a["scores"]["reap"]
        else:
            assert a["choice"] == "reap" and len(plan.dropped) == 8
            assert all(len(g.members) == 1 for g in plan.groups)


def test_the_score_is_the_measured_output_error():
    """The score of a plan is the relative squared error of the compressed block's output on the held-out
    tokens; keeping every expert scores 0; the routed-only evaluation equals the dense forward."""
    gen = torch.Generator().manual_seed(12)
    block, x = make_block(gen), tokens(gen, 512)
    assert torch.allclose(block_output(block, x), block.forward(x), atol=1e-4)
    st = observe(block, x)
    scorer = Scorer(block, [x[:256], x[256:]])
    keep_all = get_method("reap").plan_layer(MethodInput(st, block, N))
    assert scorer(keep_all) == pytest.approx(0, abs=1e-10)
    plan = get_method("reap").plan_layer(MethodInput(st, block, 8))
    from reamkit.compression.candidates import compressed_block

    small = compressed_block(block, plan)
    ref, got = block.forward(x).double(), small.forward(x).double()
    assert scorer(plan) == pytest.approx(float(((ref - got) ** 2).sum() / (ref ** 2).sum()), rel=1e-4)


def test_candidates_parse_and_refuse():
    got = parse("reap,ream:2,ream:n/8,ream:4,ream:8,ream:16", 16, 12, {})
    # n/8 of 16 is 2 (already listed); 8 and 16 both put all 4 removed experts with the top centroid
    assert [c[0] for c in got] == ["reap", "ream:2", "ream:4", "ream:8"]
    assert [c[0] for c in parse("ream:2,ream:4", 16, 4, {})] == ["ream:4"]      # 2 cannot absorb 12 into 4
    for bad in ("ream:1", "reap:2", "auto", "ream:auto", "nope"):
        with pytest.raises(ReamkitError):
            parse(bad, 16, 12, {})
    assert heldout_batches(16, 0.25) == {3, 7, 11, 15} and heldout_batches(1, 0.25) == set()
    assert heldout_batches(4, 0.25) == {3} and heldout_batches(3, 0) == set()
    x = torch.arange(40000.0)[:, None].repeat(1, 2)
    few, thin = heldout_rows(x[:100], 4, 0), heldout_rows(x, 4, 0)
    assert torch.equal(few, x[:100]) and thin.shape == (HELDOUT_TOKENS // 4, 2)
    assert thin[:, 0].unique().numel() == len(thin)                  # distinct positions of the batch


def test_ream_group_size_auto_chooses_among_group_sizes():
    gen = torch.Generator().manual_seed(13)
    block, x = near_duplicate_block(gen), tokens(gen, 4096)
    st = observe(block, x[:3072], batches=3)
    plan = get_method("ream").plan_layer(MethodInput(st, block, 8, method_options("ream", {"group_size": "auto"}),
                                                     heldout=[x[3072:]]))
    assert set(plan.notes["auto"]["scores"]) == {"ream:2", "ream:4", "ream:8", "ream:16"}
    assert plan.notes["auto"]["choice"] == "ream:2"


def test_auto_through_the_pass_reports_each_layer_and_the_card_shows_it(tmp_path):
    """The layer pass holds batches out, auto scores candidates per layer, report.{json,md} and the card's
    per-layer table carry the scores and the choice of every MoE layer."""
    from reamkit.zoo import build_cached

    out = tmp_path / "run" / "models" / "auto"
    res = compress(build_cached("qwen3_moe"), out, CompressOptions(
        method="auto", ratio=0.25, samples=8, seq_len=32, batch_size=2,
        method_options={"candidates": "reap,ream:2"}))
    layers = [lay for lay in json.loads((out / "compression" / "report.json").read_text())["layers"] if lay["moe"]]
    assert layers and res.report["sequential"] is True
    for lay in layers:
        a = lay["auto"]
        assert set(a["scores"]) == {"reap", "ream:2"} and a["choice"] in a["scores"]
        assert a["heldout_tokens"] == 2 * 32                  # one of the 4 batches of 2 x 32 tokens
        assert (lay["groups"] == []) == (a["choice"] == "reap")
    md = (out / "compression" / "report.md").read_text()
    assert "Plan per layer, chosen by measured error" in md
    run = tmp_path / "run"
    (run / "variants.json").write_text(json.dumps({"m.Q8_0": {"path": "m.gguf", "model": "auto", "method": "auto",
                                                              "experts": res.report["experts_after"]}}))
    card = "\n".join(_layer_plan_lines(compression_facts(run)))
    assert "Compression plan per layer of `auto`" in card
    for lay in layers:
        row = next(r for r in card.splitlines() if r.startswith(f"| {lay['layer']} |"))
        assert lay["auto"]["choice"] in row and f"**{lay['auto']['scores'][lay['auto']['choice']]:.4g}**" in row


# ---------------------------------------------------------------------- REAM reference alignment
def released_alignment(block, batches, pairs, per, seed, pca_dim):
    """The released code's alignment, written again from its description: every expert's per-neuron rows
    concat(W_gate[a], W_up[a], W_down[:, a]) normalised, centred, projected by torch.pca_lowrank (niter 2,
    seeded 0) as x @ (V * s) and normalised again; activations sampled per batch at a fresh permutation for
    every expert in turn; Hungarian on the sum of the two distance matrices."""
    e = block.experts
    rows = torch.cat([e.gate.float(), e.up.float(), e.down.float().transpose(1, 2)], dim=-1)
    rows = torch.nn.functional.normalize(rows, dim=-1).flatten(0, 1)
    x = rows - rows.mean(0, keepdim=True)
    torch.manual_seed(0)
    _, s, v = torch.pca_lowrank(x, q=pca_dim)
    w = torch.nn.functional.normalize((x @ (v * s[None])).reshape(N, D, pca_dim), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    acts = {i: [] for i in range(N)}
    for xb in batches:
        for i in range(N):
            pos = torch.randperm(xb.shape[0], generator=gen)[:per]
            h = torch.nn.functional.silu(xb[pos] @ e.gate[i].T) * (xb[pos] @ e.up[i].T)
            acts[i].append(h)
    act = {i: torch.nn.functional.normalize(torch.cat(v).T, dim=-1) for i, v in acts.items()}
    perms = []
    for centroid, j in pairs:
        cost = torch.cdist(act[centroid].double(), act[j].double()) + torch.cdist(w[centroid].double(),
                                                                                 w[j].double())
        perms.append(linear_sum_assignment(cost.numpy())[1].tolist())
    return perms


def test_reference_alignment_matches_the_released_code_and_recovers_planted_permutations():
    """Experts 8..15 are neuron-permuted noisy copies of 0..7 (the known answer: the planted permutations).
    The reference variant's permutations equal the re-implementation's and the planted ones; the features
    differ from the paper variant's (scaled projection, per-expert positions)."""
    gen = torch.Generator().manual_seed(14)
    block, x = make_block(gen), tokens(gen, 2048)
    planted = {}
    for j in range(8):
        p = torch.randperm(D, generator=gen)
        copy_expert(block, 8 + j, j, perm=p, noise=0.02, gen=gen)
        block.router[8 + j] = block.router[j]
        block.router[8 + j, 0] -= 3.0
        planted[8 + j] = p.tolist()
    batches = list(x.chunk(4))
    st = observe(block, x, batches=4)
    per = st.options.activation_samples // st.batches
    opts = method_options("ream", {"variant": "reference", "group_size": 2})
    plan = get_method("ream").plan_layer(MethodInput(st, block, 8, opts, sequences=64,
                                                     moe_inputs=lambda: iter(batches)))
    paper = get_method("ream").plan_layer(MethodInput(st, block, 8, method_options("ream", {"group_size": 2}),
                                                      sequences=64))
    assert sorted(tuple(sorted(g.members)) for g in plan.groups) == [(j, 8 + j) for j in range(8)]
    again = released_alignment(block, batches, [tuple(g.members) for g in plan.groups], per, 0, 64)
    for g, perm_again in zip(plan.groups, again):
        (c, m), perm = g.members, g.perms[1]
        assert perm == perm_again
        # merged neuron a of the centroid is matched with the copy's neuron that holds it
        assert perm == np.argsort(planted[m]).tolist()
    assert [g.perms for g in plan.groups] == [g.perms for g in paper.groups]   # same answer, other features
    from reamkit.compression.align import PCAFeatures
    from reamkit.compression.align_reference import per_expert_samples

    scaled, plain = PCAFeatures(block.experts, 64, 0, niter=2, scaled=True), PCAFeatures(block.experts, 64, 0)
    assert not torch.allclose(scaled[0], plain[0], atol=1e-3)
    acts = per_expert_samples(iter(batches), block, [0, 8], per)
    pos0 = torch.randperm(len(batches[0]), generator=torch.Generator().manual_seed(0))[:per]   # expert 0's draw
    assert acts[0].shape == (4 * per, D)
    assert torch.allclose(acts[0][:per], block.expert_hidden(batches[0][pos0], torch.tensor([0]))[0], atol=1e-5)
    assert not torch.allclose(acts[8][:per], block.expert_hidden(batches[0][pos0], torch.tensor([8]))[0], atol=1e-3)


def test_auto_without_a_batch_to_hold_out_is_refused_before_work(tmp_path):
    from reamkit.zoo import build_cached

    with pytest.raises(ReamkitError, match="held-out calibration batches"):
        compress(build_cached("qwen3_moe"), tmp_path / "out", CompressOptions(method="auto", ratio=0.25, samples=4,
                                                                              seq_len=32, batch_size=8))
    assert not (tmp_path / "out").exists()


def test_reference_alignment_matches_the_released_code_on_unrelated_experts():
    """Without a planted answer the permutations depend on every detail of the features: the reference
    variant's equal the re-implementation's, and differ from the paper variant's."""
    gen = torch.Generator().manual_seed(15)
    block, x = make_block(gen), tokens(gen, 2048)
    batches = list(x.chunk(4))
    st = observe(block, x, batches=4)
    per = st.options.activation_samples // st.batches
    ref = get_method("ream").plan_layer(MethodInput(st, block, 8, method_options(
        "ream", {"variant": "reference", "group_size": 2}), sequences=64, moe_inputs=lambda: iter(batches)))
    paper = get_method("ream").plan_layer(MethodInput(st, block, 8, method_options(
        "ream", {"variant": "reference", "group_size": 2}), sequences=64))      # shared positions, same groups
    merged = [g for g in ref.groups if len(g.members) > 1]
    assert merged and [g.members for g in merged] == [g.members for g in paper.groups if len(g.members) > 1]
    again = released_alignment(block, batches, [tuple(g.members) for g in merged], per, 0, 64)
    assert [g.perms[1] for g in merged] == again
    assert [g.perms[1] for g in merged] != [g.perms[1] for g in paper.groups if len(g.members) > 1]
