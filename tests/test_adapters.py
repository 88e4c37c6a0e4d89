"""Architecture adapters: where things live, how routing works, how the config changes."""

from __future__ import annotations

import pytest
import torch

from reamkit.errors import CheckpointError, UnsupportedArchitectureError
from reamkit.models import ADAPTERS, Experts, get_adapter, open_model

from .conftest import masked_router

def _hf_layer(ad, config, index, tensors):
    """The decoder layer transformers builds for ``config`` with ``tensors`` (the reference)."""
    return ad.build_layer(ad.hf_config(config), index, tensors)


@pytest.mark.parametrize("norm_topk", [True, False])
def test_routing_matches_the_transformers_router(zoo_path, family, norm_topk):
    model = open_model(zoo_path)
    ckpt, ad = model.checkpoint, model.adapter
    config = {**ckpt.config, "norm_topk_prob": norm_topk}   # Mixtral has no such switch: both ignore it
    tensors = ckpt.load_layer(0)
    gate = _hf_layer(ad, config, 0, tensors).mlp.gate
    routing = ad.routing(config)
    assert (routing.num_experts, routing.top_k) == (gate.weight.shape[0], gate.top_k)

    x = torch.randn(64, config["hidden_size"], generator=torch.Generator().manual_seed(0))
    _, hf_w, hf_idx = gate(x)
    router = tensors[ad.router_key(ad.expert_layout(ckpt.layer_infos(0)))]
    w, idx = routing.weights(x @ router.T)
    assert torch.equal(idx, hf_idx)
    assert torch.allclose(w, hf_w.float(), atol=1e-6)       # fails if renormalisation is wrong either way


def test_shared_expert_names_are_the_transformers_modules(zoo_path):
    model = open_model(zoo_path)
    ckpt, ad = model.checkpoint, model.adapter
    tensors = ckpt.load_layer(1)
    mlp = _hf_layer(ad, ckpt.config, 1, tensors).mlp
    extra = {name for name, _ in mlp.named_children()} - {"gate", "experts"}
    assert extra == {n for n in (ad.shared_expert, ad.shared_expert_gate) if n}
    for name in extra:   # and they are read from the checkpoint under those names
        for key, t in getattr(mlp, name).state_dict().items():
            assert torch.equal(tensors[f"mlp.{name}.{key}"], t)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_expert_access_and_replacement(zoo_path, family, layout):
    model = open_model(zoo_path)
    ckpt, ad = model.checkpoint, model.adapter
    tensors = ad.convert_layout(ckpt.load_layer(1), layout)
    assert ad.expert_layout(tensors) == layout
    full = _hf_layer(ad, ckpt.config, 1, tensors)
    ex = ad.experts(tensors)
    gate_up, down = full.mlp.experts.gate_up_proj, full.mlp.experts.down_proj   # [E, 2D, H], [E, H, D]
    n, d = gate_up.shape[0], gate_up.shape[1] // 2
    assert torch.equal(ex.gate, gate_up[:, :d]) and torch.equal(ex.up, gate_up[:, d:]) and torch.equal(ex.down, down)

    # keep experts [1, 3, 5, ...]: fewer experts, a smaller router, everything else untouched
    keep = list(range(1, n, 2))
    router = tensors[ad.router_key(layout)]
    new = ad.replace_experts(tensors, Experts(ex.gate[keep], ex.up[keep], ex.down[keep]), router[keep])
    assert ad.stored_experts(new) == len(keep)
    assert torch.equal(ad.experts(new).down[1], ex.down[3])
    for name, t in tensors.items():
        if not ad.is_expert_key(name) and name != ad.router_key(layout):
            assert new[name] is t, name

    cfg = ad.with_num_experts(ckpt.config, len(keep))
    assert ad.num_experts(cfg) == len(keep) and cfg[ad.top_k_key] == ckpt.config[ad.top_k_key]
    assert ad.num_experts(ckpt.config) == n                      # input config untouched
    pruned = _hf_layer(ad, cfg, 1, new)                           # a layer of the smaller model builds ...
    assert pruned.mlp.experts.gate_up_proj.shape[0] == len(keep)
    x = torch.randn(1, 32, ckpt.config["hidden_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():                                         # ... and computes the full MoE block with
        got = pruned.mlp(x)                                       # the removed experts masked out
        ref = masked_router(full, ad, keep).mlp(x)
        assert (got - ref).abs().max().item() < 1e-5
        assert (got - _hf_layer(ad, ckpt.config, 1, tensors).mlp(x)).abs().max().item() > 1e-3
    with pytest.raises(CheckpointError, match="fewer than top-k"):
        ad.with_num_experts(ckpt.config, ckpt.config[ad.top_k_key] - 1)


def test_qwen3_moe_reads_hub_style_expert_key():
    """Hub Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts. Both work."""
    ad = get_adapter("qwen3_moe")
    assert ad.num_experts({"num_experts": 128}) == 128
    assert ad.num_experts({"num_local_experts": 96}) == 96
    assert ad.with_num_experts({"num_experts": 128, "num_experts_per_tok": 8}, 96) == {
        "num_experts": 96, "num_experts_per_tok": 8}


def test_unsupported_model_type_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_adapter({"model_type": "deepseek_v3"})
    msg = str(e.value)
    assert "deepseek_v3" in msg and all(name in msg for name in ADAPTERS)


def test_qwen3_next_layer_types():
    ad = get_adapter("qwen3_next")
    cfg = {"num_hidden_layers": 48, "full_attention_interval": 4}
    types = [ad.layer_type(cfg, i) for i in range(48)]
    assert types.count("full_attention") == 12 and types[3] == "full_attention" and types[0] == "linear_attention"
