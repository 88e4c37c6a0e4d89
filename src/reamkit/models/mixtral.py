"""Mixtral (Mixtral-8x7B / 8x22B).

Full attention (optionally sliding-window) in every layer; every MLP is a sparse MoE block. Per-expert
checkpoints name it ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up), ``w2`` (down);
transformers 5 calls the module ``mlp``. Routing: softmax -> top-k -> always renormalised (the same as
softmax over the top-k logits). Expert count key: ``num_local_experts``. No shared expert.
"""

from __future__ import annotations

from .base import Adapter


class MixtralAdapter(Adapter):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    hf_module = "transformers.models.mixtral.modeling_mixtral"
    hf_prefix = "Mixtral"
    num_experts_keys = ("num_local_experts",)
    norm_topk_key = None
    per_expert_moe = "block_sparse_moe"
    proj = ("w1", "w3", "w2")
    gguf_arch = "llama"          # the converter writes Mixtral as llama with experts
    gguf_reads_fused = False     # the pinned converter maps only block_sparse_moe.experts.N.w1/w2/w3
