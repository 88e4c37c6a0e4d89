"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B).

Full attention in every layer; sparse MoE MLP ``mlp`` (router ``mlp.gate``: softmax -> top-k ->
renormalise when ``norm_topk_prob``) in the layers selected by ``decoder_sparse_step`` and
``mlp_only_layers``. No shared expert. GGUF: ``qwen3moe``, with per-head q/k norms.
"""

from __future__ import annotations

from .base import Adapter


class Qwen3MoeAdapter(Adapter):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    hf_module = "transformers.models.qwen3_moe.modeling_qwen3_moe"
    hf_prefix = "Qwen3Moe"
    # Hub configs say num_experts; transformers 5 saves num_local_experts (an alias of it).
    num_experts_keys = ("num_experts", "num_local_experts")
    gguf_arch = "qwen3moe"
    gguf_qk_norm = True
