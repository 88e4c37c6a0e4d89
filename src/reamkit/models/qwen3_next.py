"""Qwen3-Next (Qwen3-Coder-Next): the reference architecture.

Hybrid token mixers: Gated DeltaNet linear attention, with gated full attention every
``full_attention_interval``-th layer (``layer_types``). Every layer's MLP is a sparse MoE block:
router ``mlp.gate`` (softmax -> top-k -> renormalise, ``norm_topk_prob``), routed experts ``mlp.experts``,
one shared expert ``mlp.shared_expert`` scaled by ``sigmoid(mlp.shared_expert_gate(x))``.
Hub checkpoints also carry a multi-token-prediction block under ``mtp.*`` with its own MoE, which
transformers does not load; reamkit carries it through as a non-layer tensor group.
"""

from __future__ import annotations

import re

from ..errors import CheckpointError
from .base import Adapter

_MTP_LAYER = re.compile(r"^mtp\.layers\.\d+\.")


class Qwen3NextAdapter(Adapter):
    model_type = "qwen3_next"
    architecture = "Qwen3NextForCausalLM"
    hf_module = "transformers.models.qwen3_next.modeling_qwen3_next"
    hf_prefix = "Qwen3Next"
    shared_expert = "shared_expert"
    shared_expert_gate = "shared_expert_gate"

    def layer_type(self, config: dict, index: int) -> str:
        types = config.get("layer_types")
        if types:
            return types[index]
        interval = int(config.get("full_attention_interval", 4))
        return "full_attention" if (index + 1) % interval == 0 else "linear_attention"

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
