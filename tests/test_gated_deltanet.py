"""Qwen3-Next's linear attention in the layer pass (``models/gated_deltanet.py``) computes what transformers'
reference kernels compute: the chunked delta rule in the same order (bit for bit), the causal conv to float
rounding, and a built layer with the installed forward the same outputs as with transformers' own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from reamkit.compression.layerwise import LayerwiseModel
from reamkit.models import gated_deltanet, open_model

from .conftest import reference_ids


def _inputs(b, t, hk, hv, d, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return (r(b, t, hk, d).to(dtype), r(b, t, hk, d).to(dtype), r(b, t, hv, d).to(dtype),
            -torch.rand(b, t, hv, generator=gen) * 0.7, torch.rand(b, t, hv, generator=gen).to(dtype))


@pytest.mark.parametrize("t,hk,hv", [(256, 2, 4), (200, 2, 2), (37, 1, 4)])
def test_chunked_delta_rule_is_the_reference_kernel_bit_for_bit(t, hk, hv):
    """Sequences a multiple of the chunk and not (padding), key heads shared by 1, 2 or 4 value heads."""
    q, k, v, g, beta = _inputs(3, t, hk, hv, 32)
    ref, _ = hf.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    got = gated_deltanet.chunk_gated_delta_rule(q, k, v, g, beta)
    assert got.shape == ref.shape == (3, t, hv, 32)
    assert torch.equal(got, ref)


def test_chunked_delta_rule_in_bf16_computes_in_float32():
    q, k, v, g, beta = _inputs(2, 130, 2, 4, 32, dtype=torch.bfloat16)
    ref, _ = hf.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    got = gated_deltanet.chunk_gated_delta_rule(q, k, v, g, beta)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_causal_conv_is_the_reference_depthwise_conv(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 24, generator=gen).to(dtype)           # [B, T, C], the projections' layout
    w = torch.randn(24, 4, generator=gen).to(dtype)
    ref = hf.causal_conv1d_fn(x.transpose(1, 2), w, None, activation="silu").transpose(1, 2)
    got = gated_deltanet.causal_conv(x, w, None, silu=True)
    assert got.dtype == dtype and got.shape == x.shape
    assert ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item() < tol
    # causal: a token's output does not depend on later tokens
    late = x.clone()
    late[:, 30:] += 1
    assert torch.equal(gated_deltanet.causal_conv(late, w, None, silu=True)[:, :30], got[:, :30])
    bias = torch.randn(24, generator=gen).to(dtype)
    with_bias = hf.causal_conv1d_fn(x.transpose(1, 2), w, bias, activation="silu").transpose(1, 2)
    got = gated_deltanet.causal_conv(x, w, bias, silu=True)
    assert ((got.float() - with_bias.float()).abs().max() / with_bias.float().abs().max()).item() < tol


def _stock(layer):
    """The same layer with transformers' own linear-attention forward."""
    del layer.linear_attn.forward                   # the instance attribute install() set
    return layer


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_layers_built_for_the_pass_compute_what_transformers_computes(dtype, tol):
    from reamkit.zoo import build_cached

    path = build_cached("qwen3_next")
    opened = open_model(path)
    model = LayerwiseModel(opened, dtype=dtype)
    ids = reference_ids(path, 96).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, 70:] = 0                                # padded rows: the linear attention zeroes their inputs
    hidden = model.embed(ids)
    ctx = model.context(hidden, mask)
    linear = 0
    for i in range(opened.checkpoint.num_layers):
        layer = model.layer(i)
        if opened.adapter.layer_type(opened.checkpoint.config, i) != "linear_attention":
            assert "forward" not in vars(getattr(layer, "linear_attn", layer))
            hidden = model.run_layer(layer, i, hidden, ctx)
            continue
        linear += 1
        assert "forward" in vars(layer.linear_attn)
        got = model.run_layer(layer, i, hidden, ctx)
        ref = model.run_layer(_stock(layer), i, hidden, ctx)
        real = mask.bool()
        err = ((got[real].float() - ref[real].float()).abs().max() / ref[real].float().abs().max()).item()
        assert err < tol
        if dtype == torch.float32 and i == 0:
            assert torch.equal(got[0], ref[0])       # unpadded row: the same arithmetic in the same order
        hidden = ref
    assert linear >= 2


def test_install_refuses_a_module_it_does_not_know():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_attn = torch.nn.Linear(2, 2)

    with pytest.raises(RuntimeError, match="lacks"):
        gated_deltanet.install(Odd())
    assert gated_deltanet.install(torch.nn.Linear(2, 2)) is False


def test_a_cached_or_packed_call_keeps_transformers_forward():
    """Decoding with a cache and packed sequences are transformers' business; the installed forward hands them on."""
    from reamkit.zoo import build_cached

    opened = open_model(build_cached("qwen3_next"))
    model = LayerwiseModel(opened)
    layer = model.layer(0)
    seen = []
    real = type(layer.linear_attn).forward

    def spy(self, *a, **kw):
        seen.append(kw.get("cache_params") if kw.get("cache_params") is not None else kw.get("cu_seq_lens_q"))
        return real(self, *a, **kw) if "cu_seq_lens_q" not in kw else "stock"

    type(layer.linear_attn).forward = spy
    try:
        x = F.normalize(torch.randn(1, 5, opened.config["hidden_size"]), dim=-1)
        layer.linear_attn(x)                          # no cache: the installed forward alone
        assert seen == []
        from transformers import DynamicCache
        cache = DynamicCache(config=model.hf_config)
        layer.linear_attn(x, cache_params=cache)
        assert seen == [cache]
        cu = torch.tensor([0, 2, 5])
        assert layer.linear_attn(x, cu_seq_lens_q=cu) == "stock"
        assert seen == [cache, cu]
    finally:
        type(layer.linear_attn).forward = real
