"""Running a model one decoder layer at a time gives the whole model's logits."""

from __future__ import annotations

import math

import torch

from reamkit.calibration import LayerwiseModel
from reamkit.checkpoint import Checkpoint

from .conftest import hf_logits, reference_ids


def test_layer_by_layer_matches_transformers(zoo_path, family, figure):
    ids = reference_ids(zoo_path, 160)
    ref = hf_logits(zoo_path, ids)

    ckpt = Checkpoint.open(zoo_path)
    loaded: list[int] = []
    real_load = ckpt.load_layer
    ckpt.load_layer = lambda i: (loaded.append(i), real_load(i))[1]
    seen_types: set[str] = set()

    def observe(index, layer, hidden_in, hidden_out):
        # each layer module holds only its own parameters
        n_params = sum(p.numel() for p in layer.parameters())
        assert n_params == sum(math.prod(t.shape) for t in ckpt.layer_infos(index).values())
        seen_types.add(ckpt.adapter.layer_type(ckpt.config, index))

    model = LayerwiseModel(ckpt)
    logits = model.forward(ids, on_layer=observe)[0]

    diff = (logits - ref).abs().max().item()
    figure(f"{family}: max abs diff layer-by-layer vs transformers = {diff:.3g}")
    assert diff < 1e-4
    assert loaded == list(range(ckpt.num_layers))   # each layer loaded once, when its turn came
    if family == "qwen3_next":
        assert seen_types == {"linear_attention", "full_attention"}


def test_layer_rebuilt_from_returned_tensors(zoo_path):
    """A layer built from tensors handed back by the adapter (the compression hand-off) computes the same."""
    ckpt = Checkpoint.open(zoo_path)
    model = LayerwiseModel(ckpt)
    ids = reference_ids(zoo_path, 64)
    hidden = model.embed(ids)
    ctx = model.context(hidden)
    for i in range(ckpt.num_layers):
        layer = model.layer(i)
        layout = ckpt.adapter.expert_layout(ckpt.layer_infos(i))
        tensors = ckpt.adapter.layer_tensors(layer, layout)
        assert set(tensors) == set(ckpt.layer_infos(i))
        again = model.layer(i, tensors)
        a = model.run_layer(layer, i, hidden, ctx)
        b = model.run_layer(again, i, hidden, ctx)
        assert torch.equal(a, b)
        hidden = a


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
    got = LayerwiseModel(Checkpoint.open(zoo_path)).forward(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max().item() < 1e-4
    # and the padded sequence's real part equals running it alone
    alone = LayerwiseModel(Checkpoint.open(zoo_path)).forward(ids[1:, :64])
    assert (got[1, :64] - alone[0]).abs().max().item() < 1e-4
