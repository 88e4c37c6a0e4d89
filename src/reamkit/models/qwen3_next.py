"""Qwen3-Next (Qwen3-Coder-Next): the reference architecture.

Hybrid token mixers: Gated DeltaNet linear attention, with gated full attention every
``full_attention_interval``-th layer (``layer_types``). Every layer's MLP is a sparse MoE block:
router ``mlp.gate`` (softmax -> top-k -> renormalise, ``norm_topk_prob``), routed experts ``mlp.experts``,
one shared expert ``mlp.shared_expert`` scaled by ``sigmoid(mlp.shared_expert_gate(x))``.
Hub checkpoints also carry a multi-token-prediction block under ``mtp.*`` with its own MoE, which
transformers does not load; reamkit carries it through as a non-layer tensor group.

GGUF (``qwen3next``, the pinned converter's modern layout): full-attention layers hold a gated query
(``attn_q`` twice as wide) and q/k norms; linear-attention layers ``attn_qkv`` + ``attn_gate`` and the
``ssm_*`` tensors; no MTP block. Memory: only the full-attention layers hold a KV cache; each linear-attention
layer keeps a fixed recurrent state per sequence: a conv state of ``(conv_kernel - 1) x (2 x n_k_heads x k_dim
+ n_v_heads x v_dim)`` and an SSM state of ``n_v_heads x k_dim x v_dim`` elements.
"""

from __future__ import annotations

import re

from ..errors import CheckpointError
from . import gated_deltanet
from .base import Adapter
from .facts import ATTENTION, DENSE_FFN, OUTPUT, SHARED_EXPERT, Memory, Shape, heads

_MTP_LAYER = re.compile(r"^mtp\.layers\.\d+\.")


class Qwen3NextAdapter(Adapter):
    model_type = "qwen3_next"
    architecture = "Qwen3NextForCausalLM"
    hf_module = "transformers.models.qwen3_next.modeling_qwen3_next"
    hf_prefix = "Qwen3Next"
    shared_expert = "shared_expert"
    shared_expert_gate = "shared_expert_gate"
    gguf_arch = "qwen3next"
    gguf_f32 = ("ssm_conv1d.weight",)
    always_active = (ATTENTION, r"\.attn_(qkv|gate)\.weight$",     # linear attention's qkv and z gate
                     r"\.ssm_[a-z0-9_]+\.weight$",                 # its other projections (ssm_ba, ssm_out)
                     SHARED_EXPERT, DENSE_FFN, OUTPUT)

    def layer_type(self, config: dict, index: int) -> str:
        types = config.get("layer_types")
        if types:
            return types[index]
        interval = int(config.get("full_attention_interval", 4))
        return "full_attention" if (index + 1) % interval == 0 else "linear_attention"

    def build_layer(self, hf_config, index, tensors, dtype=None):
        # Linear-attention layers get a whole-sequence forward that skips the reference kernels' copies.
        layer = super().build_layer(hf_config, index, tensors, dtype)
        gated_deltanet.install(layer)
        return layer

    def layer_masks(self, hf_config, embeds, position_ids, attention_mask):
        from transformers.masking_utils import create_recurrent_attention_mask

        masks = super().layer_masks(hf_config, embeds, position_ids, attention_mask)
        masks["linear_attention"] = create_recurrent_attention_mask(
            config=hf_config, inputs_embeds=embeds, attention_mask=attention_mask,
            past_key_values=None, position_ids=position_ids)
        return masks

    def mtp_layers(self, ckpt) -> list[str]:
        """Prefixes of the MTP decoder layers present (``mtp.layers.0.``), usually none or one."""
        found = {m.group(0) for n in ckpt.other_names if (m := _MTP_LAYER.match(n))}
        return sorted(found, key=lambda p: int(p.split(".")[2]))

    def moe_groups(self, ckpt) -> list[str]:
        return super().moe_groups(ckpt) + self.mtp_layers(ckpt)

    def check(self, ckpt) -> None:
        super().check(ckpt)
        # The MTP block (when present) has its own MoE with the same expert count.
        n = self.num_experts(ckpt.config)
        for prefix in self.mtp_layers(ckpt):
            infos = {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
            stored = self.stored_experts(infos)
            if stored != n:
                raise CheckpointError(f"config.json says num_experts={n} but MTP layer {prefix} holds {stored} experts")

    def gguf_converter_args(self, ckpt) -> list[str]:
        # The converter asserts that a Qwen3-Next checkpoint carries mtp.* tensors, as Hub checkpoints do;
        # checkpoints written by transformers (and compressed ones made from them) have none.
        has_mtp = any(n.startswith("mtp.") for n in ckpt.other_names)
        return super().gguf_converter_args(ckpt) + ([] if has_mtp else ["--no-mtp"])

    # ------------------------------------------------------------------ GGUF and memory
    def _is_full(self, c: dict, i: int) -> bool:
        return self.layer_type(c, i) == "full_attention"

    def gguf_layer(self, c: dict, i: int, experts: int) -> list[tuple[str, Shape]]:
        h, n_head, n_kv, hd = heads(c)
        out: list[tuple[str, Shape]] = [("attn_norm.weight", (h,)), ("post_attention_norm.weight", (h,))]
        if self._is_full(c, i):
            out += [("attn_q.weight", (h, 2 * n_head * hd)), ("attn_k.weight", (h, n_kv * hd)),
                    ("attn_v.weight", (h, n_kv * hd)), ("attn_output.weight", (n_head * hd, h)),
                    ("attn_q_norm.weight", (hd,)), ("attn_k_norm.weight", (hd,))]
        else:
            nk, dk = int(c["linear_num_key_heads"]), int(c["linear_key_head_dim"])
            nv, dv = int(c["linear_num_value_heads"]), int(c["linear_value_head_dim"])
            conv = 2 * nk * dk + nv * dv
            kernel = int(c["linear_conv_kernel_dim"])
            out += [("ssm_a", (nv,)), ("ssm_dt.bias", (nv,)), ("ssm_conv1d.weight", (kernel, conv)),
                    ("ssm_ba.weight", (h, 2 * nv)), ("attn_qkv.weight", (h, conv)), ("attn_gate.weight", (h, nv * dv)),
                    ("ssm_norm.weight", (dv,)), ("ssm_out.weight", (nv * dv, h))]
        return out + (self.gguf_moe(c, experts) if experts else self.gguf_dense_ffn(c))

    def memory(self, c: dict) -> Memory:
        h, _n_head, n_kv, hd = heads(c)
        n = int(c["num_hidden_layers"])
        full = sum(1 for i in range(n) if self._is_full(c, i))
        nk, dk = int(c["linear_num_key_heads"]), int(c["linear_key_head_dim"])
        nv, dv = int(c["linear_num_value_heads"]), int(c["linear_value_head_dim"])
        return Memory(n, full, n_kv, hd, hd, n_linear=n - full, conv_kernel=int(c["linear_conv_kernel_dim"]),
                      conv_dim=2 * nk * dk + nv * dv, ssm_state=nv * dk * dv, n_vocab=int(c["vocab_size"]), n_embd=h)

    def memory_from_gguf(self, meta, n_vocab: int) -> Memory:
        base = super().memory_from_gguf(meta, n_vocab)
        n, interval = base.n_layers, int(meta("full_attention_interval", 4))
        full = sum(1 for i in range(n) if (i + 1) % interval == 0)
        dk, nk = int(meta("ssm.state_size")), int(meta("ssm.group_count"))
        inner = int(meta("ssm.inner_size"))
        return Memory(n, full, base.n_kv_heads, base.k_dim, base.v_dim, n_linear=n - full,
                      conv_kernel=int(meta("ssm.conv_kernel")), conv_dim=2 * nk * dk + inner, ssm_state=inner * dk,
                      n_vocab=n_vocab, n_embd=base.n_embd)
