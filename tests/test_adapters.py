"""Architecture adapters: where things live, how routing works, how the config changes."""

from __future__ import annotations

import pytest
import torch

from reamkit.errors import CheckpointError, UnsupportedArchitectureError
from reamkit.models import ADAPTERS, Experts, get_adapter, open_model

EXPECTED = {   # family -> (experts, top_k, renormalise, shared expert)
    "qwen3_next": (16, 4, True, True),
    "qwen3_moe": (16, 4, True, False),
    "mixtral": (8, 2, True, False),
}


def test_routing_matches_the_transformers_router(zoo_path, family):
    model = open_model(zoo_path)
    ckpt, ad = model.checkpoint, model.adapter
    n, k, renorm, _ = EXPECTED[family]
    routing = ad.routing(ckpt.config)
    assert (routing.num_experts, routing.top_k, routing.renormalize) == (n, k, renorm)

    layer = ad.build_layer(ad.hf_config(ckpt.config), 0, ckpt.load_layer(0))
    x = torch.randn(64, ckpt.config["hidden_size"], generator=torch.Generator().manual_seed(0))
    _, hf_w, hf_idx = layer.mlp.gate(x)
    router = ckpt.load_layer(0)[ad.router_key(ad.expert_layout(ckpt.layer_infos(0)))]
    w, idx = routing.weights(x @ router.T)
    assert torch.equal(idx, hf_idx)
    assert torch.allclose(w, hf_w.float(), atol=1e-6)
    if renorm:
        assert torch.allclose(w.sum(-1), torch.ones(64))


def test_expert_access_and_replacement(zoo_path, family):
    model = open_model(zoo_path)
    ckpt, ad = model.checkpoint, model.adapter
    tensors = ckpt.load_layer(1)
    ex = ad.experts(tensors)
    n, _, _, shared = EXPECTED[family]
    h, d = ckpt.config["hidden_size"], ckpt.config.get("moe_intermediate_size", ckpt.config["intermediate_size"])
    assert ex.gate.shape == (n, d, h) and ex.up.shape == (n, d, h) and ex.down.shape == (n, h, d)
    assert (ad.shared_expert is not None) == shared
    if shared:
        assert f"mlp.{ad.shared_expert}.gate_proj.weight" in tensors
        assert f"mlp.{ad.shared_expert_gate}.weight" in tensors

    # keep experts [0, 2, 4, ...]: fewer experts, a smaller router, everything else untouched
    keep = list(range(0, n, 2))
    layout = ad.expert_layout(tensors)
    router = tensors[ad.router_key(layout)]
    new = ad.replace_experts(tensors, Experts(ex.gate[keep], ex.up[keep], ex.down[keep]), router[keep])
    assert ad.stored_experts(new) == len(keep)
    assert torch.equal(ad.experts(new).down[1], ex.down[2])
    for name, t in tensors.items():
        if not ad.is_expert_key(name) and name != ad.router_key(layout):
            assert new[name] is t, name

    cfg = ad.with_num_experts(ckpt.config, len(keep))
    assert ad.num_experts(cfg) == len(keep) and cfg[ad.top_k_key] == ckpt.config[ad.top_k_key]
    assert ad.num_experts(ckpt.config) == n                      # input config untouched
    layer = ad.build_layer(ad.hf_config(cfg), 1, new)            # a layer of the smaller model builds
    assert layer.mlp.experts.gate_up_proj.shape[0] == len(keep)
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
