"""Running a model one decoder layer at a time gives the whole model's logits."""

from __future__ import annotations

import math

import torch

from reamkit.compression.layerwise import LayerwiseModel
from reamkit.models import Experts, open_model

from .conftest import hf_logits, masked_router, reference_ids


def test_layer_by_layer_matches_transformers(zoo_path, family, figure):
    ids = reference_ids(zoo_path, 160)
    ref = hf_logits(zoo_path, ids)

    opened = open_model(zoo_path)
    ckpt = opened.checkpoint
    loaded: list[int] = []
    real_load = ckpt.load_layer
    ckpt.load_layer = lambda i: (loaded.append(i), real_load(i))[1]
    seen_types: set[str] = set()

    def observe(index, layer, hidden_in, hidden_out):
        # each layer module holds only its own parameters
        n_params = sum(p.numel() for p in layer.parameters())
        assert n_params == sum(math.prod(t.shape) for t in ckpt.layer_infos(index).values())
        seen_types.add(opened.adapter.layer_type(ckpt.config, index))

    model = LayerwiseModel(opened)
    logits = model.forward(ids, on_layer=observe)[0]

    diff = (logits - ref).abs().max().item()
    figure(f"{family}: max abs diff layer-by-layer vs transformers = {diff:.3g}")
    assert diff < 1e-4
    assert loaded == list(range(ckpt.num_layers))   # each layer loaded once, when its turn came
    if family == "qwen3_next":
        assert seen_types == {"linear_attention", "full_attention"}


def test_pruned_layer_handed_back_runs_at_its_own_size(zoo_path, family, figure):
    """The compression hand-off: a layer's tensors come back with half the experts (and the router rows to
    match); the layer-at-a-time model builds and runs it, and it computes what the full layer computes when the removed
    experts' router logits are -inf."""
    opened = open_model(zoo_path)
    ckpt, ad = opened.checkpoint, opened.adapter
    model = LayerwiseModel(opened)
    n = ad.num_experts(ckpt.config)
    keep = list(range(1, n, 2))                      # odd experts: the kept ones are renumbered 0..n/2-1
    hidden = model.embed(reference_ids(zoo_path, 64))
    ctx = model.context(hidden)
    diffs = []
    for i in range(ckpt.num_layers):
        layout = ad.expert_layout(ckpt.layer_infos(i))
        full = model.layer(i)
        tensors = ad.layer_tensors(full, layout)
        assert set(tensors) == set(ckpt.layer_infos(i))
        full_out = model.run_layer(full, i, hidden, ctx)
        assert torch.equal(model.run_layer(model.layer(i, tensors), i, hidden, ctx), full_out)

        ex = ad.experts(tensors)
        pruned_tensors = ad.replace_experts(tensors, Experts(ex.gate[keep], ex.up[keep], ex.down[keep]),
                                            tensors[ad.router_key(layout)][keep])
        pruned = model.layer(i, pruned_tensors)
        assert ad.stored_experts(ad.layer_tensors(pruned, layout)) == len(keep)
        got = model.run_layer(pruned, i, hidden, ctx)
        ref = model.run_layer(masked_router(model.layer(i), ad, keep), i, hidden, ctx)
        diffs.append((got - ref).abs().max().item())
        assert diffs[-1] < 1e-5
        assert (got - full_out).abs().max().item() > 1e-2       # pruning changed the layer's output
        hidden = got
    figure(f"{family}: pruned {n}->{len(keep)} layer vs full layer with masked router: max abs diff "
           f"{max(diffs):.2g}")


def test_padded_batch_matches_transformers(zoo_path, family):
    """Calibration batches are padded: with the same attention mask, real positions get the same logits."""
    from transformers import AutoModelForCausalLM

    ids = reference_ids(zoo_path, 96).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, 64:] = 0                      # second sequence is 64 tokens, right-padded
    ids[1, 64:] = 0
    model = AutoModelForCausalLM.from_pretrained(str(zoo_path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    got = LayerwiseModel(open_model(zoo_path)).forward(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max().item() < 1e-4
    # and the padded sequence's real part equals running it alone
    alone = LayerwiseModel(open_model(zoo_path)).forward(ids[1:, :64])
    assert (got[1, :64] - alone[0]).abs().max().item() < 1e-4


def test_bf16_experts_compute_as_their_float32_widening(zoo_path, family, figure):
    """A bf16 checkpoint's layer run in float32 keeps its routed experts in bf16 and widens one expert at a
    time (``models/upcast.py``); widening is exact, so it must compute what the same weights widened to
    float32 up front compute, with half the experts' bytes held."""
    opened = open_model(zoo_path)
    ad = opened.adapter
    model = LayerwiseModel(opened)
    hidden = model.embed(reference_ids(zoo_path, 96))
    ctx = model.context(hidden)
    diffs = []
    for i in range(opened.checkpoint.num_layers):
        bf16 = {k: v.bfloat16() for k, v in opened.checkpoint.load_layer(i).items()}
        narrow = model.layer(i, bf16)
        wide = model.layer(i, {k: v.float() for k, v in bf16.items()})
        experts = {k: v for k, v in narrow.state_dict().items() if ".experts." in k}
        assert experts and all(v.dtype == torch.bfloat16 for v in experts.values())
        assert all(v.dtype == torch.float32 for k, v in wide.state_dict().items())
        got, ref = model.run_layer(narrow, i, hidden, ctx), model.run_layer(wide, i, hidden, ctx)
        assert got.dtype == torch.float32
        diffs.append(((got - ref).abs().max() / ref.abs().max()).item())
        assert diffs[-1] < 1e-5
        hidden = ref
    figure(f"{family}: bf16 experts widened per expert vs float32 weights: max relative diff {max(diffs):.2g}")


def test_bf16_experts_hand_their_routed_work_to_an_observer(zoo_path, family):
    """The widening experts (``models/upcast.py``) give an observer every expert's routed inputs and hidden
    activations as they compute them; the compressed layer's importance statistics taken that way equal those
    computed again from the MoE inputs (``OutputStats.observe``). A float32 layer's experts (transformers' own
    kernel) take no observer, and say so."""
    from reamkit.compression.observe import OutputStats
    from reamkit.models.moe import MoEBlock, capture_moe_input, moe_tail, run_to_moe
    from reamkit.models.upcast import observing

    opened = open_model(zoo_path)
    ad = opened.adapter
    model = LayerwiseModel(opened)
    hidden = model.embed(reference_ids(zoo_path, 96))
    i = next(i for i in range(opened.checkpoint.num_layers) if i in ad.moe_layers(opened.checkpoint.config))
    bf16 = {k: v.bfloat16() for k, v in opened.checkpoint.load_layer(i).items()}
    layer = model.layer(i, bf16)
    seen, handle = capture_moe_input(layer, ad, stop=True)
    run_to_moe(model.run_layer, layer, i, hidden, model.context(hidden))
    handle.remove()
    resid, x = seen.pop()
    block = MoEBlock.from_tensors(ad, opened.checkpoint.config, ad.layer_tensors(layer, "fused"), dtype=None)
    n, d, h = block.experts.gate.shape
    in_forward, again = OutputStats(n, h, d), OutputStats(n, h, d)
    with observing(layer.get_submodule(f"{ad.moe}.experts"), in_forward.add) as taken:
        moe_tail(layer, ad, resid)
    assert taken
    x = x.reshape(-1, x.shape[-1])
    again.observe(block, x)
    assert torch.equal(in_forward.freq, again.freq) and int(again.freq.sum()) == len(x) * block.routing.top_k
    for a, b in ((in_forward.in_sumsq, again.in_sumsq), (in_forward.mid_sumsq, again.mid_sumsq)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    wide = model.layer(i, {k: v.float() for k, v in bf16.items()})
    with observing(wide.get_submodule(f"{ad.moe}.experts"), in_forward.add) as taken:
        assert not taken
