"""Gated DeltaNet (Qwen3-Next's linear attention) over whole sequences, without a cache: the layer pass's path.

Without flash-linear-attention and causal-conv1d (always so on a CPU) transformers runs reference PyTorch code
for the two kernels of this token mixer, about a quarter of the demo compression's layer pass: the depthwise causal
conv through a general convolution (~10 ms per 8 x 512-token batch, most of it in layout changes) and the
chunked delta rule with a copy per head repeat, transpose and pad. :func:`install` gives a built layer's
linear-attention module a forward that computes the same thing in the same order, with fewer passes over memory:

* the causal conv as K shifted fused multiply-adds (``addcmul``) in the [B, T, C] layout the projections
  produce, tap 0 first (the order the reference convolution sums in, so that float32 results agree with it);
* the chunked gated delta rule (:func:`chunk_gated_delta_rule`): queries and keys normalised before their heads
  are repeated for the value heads, each tensor copied once into the chunk layout, no padding copy when the
  length is a multiple of the chunk, masks and exponentials in place.

The arithmetic per element is unchanged (the tests compare it with transformers' own forward); cached decoding
(``cache_params``) and packed sequences (``cu_seq_lens_q``) keep transformers' forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 64                     # the reference kernel's chunk size
_ATTRS = ("in_proj_qkvz", "in_proj_ba", "fix_query_key_value_ordering", "conv1d", "A_log", "dt_bias", "norm",
          "out_proj", "key_dim", "value_dim", "head_k_dim", "head_v_dim", "activation")


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """Depthwise causal conv of ``x`` [B, T, C] with ``weight`` [C, K] along T (then SiLU): [B, T, C].

    Computed in at least float32 and returned in ``x``'s dtype (a lower-precision reference conv also
    accumulates in float32)."""
    k, t = weight.shape[-1], x.shape[1]
    acc = torch.promote_types(weight.dtype, torch.float32)
    xp = F.pad(x.to(acc), (0, 0, k - 1, 0))
    w = weight.to(acc).t()                                                  # [K, C]
    out = xp[:, :t] * w[0]
    for j in range(1, k):
        out.addcmul_(xp[:, j:j + t], w[j])
    if bias is not None:
        out += bias.to(acc)
    out = out.to(weight.dtype)
    return (F.silu(out) if silu else out).to(x.dtype)


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def chunk_gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, chunk: int = CHUNK, qk_l2norm: bool = True) -> torch.Tensor:
    """The gated delta rule's outputs [B, T, Hv, Dv] for a whole sequence from a zero state.

    ``query``/``key`` [B, T, Hk, Dk] (each key head serves Hv / Hk consecutive value heads), ``value``
    [B, T, Hv, Dv], log-decay ``g`` and learning rate ``beta`` [B, T, Hv]. Chunked as in the reference:
    within a chunk the UT transform solves one triangular system per chunk; across chunks a scan carries the
    [Dk, Dv] state per head. Computed in float32, returned in ``value``'s dtype."""
    b, t, hk, dk = key.shape
    hv, dv = value.shape[-2:]
    rep = hv // hk
    pad = (-t) % chunk
    n = (t + pad) // chunk
    q, k = query.float(), key.float()
    if qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * dk ** -0.5

    def chunked(x: torch.Tensor, r: int) -> torch.Tensor:          # [B, T, H, D] -> [B, H*r, N, C, D], one copy
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        bb, tt, h, d = x.shape
        out = x.new_empty(bb, h, r, tt, d)
        out.copy_(x.transpose(1, 2).unsqueeze(2).expand(bb, h, r, tt, d))
        return out.view(bb, h * r, n, chunk, d)

    def per_head(x: torch.Tensor) -> torch.Tensor:                 # [B, T, Hv] -> [B, Hv, N, C]
        x = x.float()
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.transpose(1, 2).reshape(b, hv, n, chunk)

    q, k, v = chunked(q, rep), chunked(k, rep), chunked(value.float(), 1)
    beta, cum = per_head(beta).unsqueeze(-1), per_head(g).cumsum(-1)
    k_beta = k * beta
    above = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill_(above, float("-inf")).exp_()
    system = (k_beta @ k.transpose(-1, -2)).mul_(decay)
    intra = (q @ k.transpose(-1, -2)).mul_(decay)
    del decay
    grow = cum.exp().unsqueeze(-1)
    new_values = torch.linalg.solve_triangular(system, v * beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(system, k_beta.mul_(grow), upper=False, unitriangular=True)
    del system, k_beta, v
    q = q.mul_(grow)
    k = k.mul_((cum[..., -1:] - cum).exp_().unsqueeze(-1))
    chunk_decay = cum[..., -1].exp()[..., None, None]
    state = q.new_zeros(b, hv, dk, dv)
    out = torch.empty(b, hv, n, chunk, dv, dtype=torch.float32, device=q.device)
    for i in range(n):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ state
        o = q[:, :, i] @ state
        o += intra[:, :, i] @ v_new
        out[:, :, i] = o
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(b, hv, n * chunk, dv)[:, :, :t]
    return out.transpose(1, 2).to(value.dtype)


def _forward(self: nn.Module, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs):
    """Qwen3-Next's GatedDeltaNet forward for whole sequences (transformers' own with a cache or packed
    sequences)."""
    if cache_params is not None or kwargs.get("cu_seq_lens_q") is not None:
        return type(self).forward(self, hidden_states, cache_params=cache_params, attention_mask=attention_mask,
                                  **kwargs)
    if attention_mask is not None:                    # padding tokens contribute nothing
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
    query, key, value, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(hidden_states),
                                                                   self.in_proj_ba(hidden_states))
    bsz, t = hidden_states.shape[:2]
    mixed = torch.cat([x.reshape(bsz, t, -1) for x in (query, key, value)], dim=-1)
    mixed = causal_conv(mixed, self.conv1d.weight.squeeze(1), self.conv1d.bias, silu=True)
    query, key, value = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    query = query.reshape(bsz, t, -1, self.head_k_dim)
    key = key.reshape(bsz, t, -1, self.head_k_dim)
    value = value.reshape(bsz, t, -1, self.head_v_dim)
    beta = b.sigmoid()
    g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
    out = chunk_gated_delta_rule(query, key, value, g, beta)
    out = self.norm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1]))
    return self.out_proj(out.reshape(bsz, t, -1))


def install(layer: nn.Module) -> bool:
    """Give ``layer``'s Gated DeltaNet module (``linear_attn``), if it has one, the whole-sequence forward
    above; returns whether it did. A module without the attributes that forward reads is refused loudly."""
    module = getattr(layer, "linear_attn", None)
    if module is None:
        return False
    missing = [a for a in _ATTRS if not hasattr(module, a)]
    if missing:
        raise RuntimeError(f"{type(module).__name__} lacks {missing}: this transformers version's Gated DeltaNet "
                           "differs from the one reamkit's forward follows")
    if module.activation not in ("silu", "swish"):
        raise RuntimeError(f"Gated DeltaNet conv activation {module.activation!r} is not supported")
    module.forward = types.MethodType(_forward, module)
    return True
