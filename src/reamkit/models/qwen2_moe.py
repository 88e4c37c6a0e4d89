"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B).

Full attention in every layer, with biases on the q/k/v projections; sparse MoE MLP ``mlp`` (router
``mlp.gate``: softmax -> top-k -> renormalise when ``norm_topk_prob``) in the layers selected by
``decoder_sparse_step`` and ``mlp_only_layers``, plus one shared expert ``mlp.shared_expert`` scaled by
``sigmoid(mlp.shared_expert_gate(x))``. GGUF: ``qwen2moe``, q/k/v biases, the shared expert as ``*_shexp``
with its gate ``ffn_gate_inp_shexp``; the converter reads fused and per-expert checkpoints.
"""

from __future__ import annotations

from .base import Adapter


class Qwen2MoeAdapter(Adapter):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    hf_module = "transformers.models.qwen2_moe.modeling_qwen2_moe"
    hf_prefix = "Qwen2Moe"
    shared_expert = "shared_expert"
    shared_expert_gate = "shared_expert_gate"
    gguf_arch = "qwen2moe"
    gguf_qkv_bias = True
