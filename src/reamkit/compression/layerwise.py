"""Run a model one decoder layer at a time.

Only one decoder layer's weights are in memory at once: the embedding turns token ids into hidden
states, then each layer is built by the family's adapter from its own tensors, applied to the whole
batch, and dropped; finally the norm and the head give logits. The layer pass of compression
(:mod:`.layerpass`) drives these pieces itself, observing and modifying each layer before moving on; a layer
handed back with fewer experts (pruned or merged) is built at its own size. :meth:`LayerwiseModel.forward` is
the plain whole-model pass, used to check a compressed checkpoint against its original (tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..models import Model


@dataclass
class LayerContext:
    """Per-batch inputs every decoder layer needs besides the hidden states."""

    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    masks: dict[str, object]          # attention mask per layer type


class LayerwiseModel:
    """A model whose decoder layers are loaded, run and released one at a time."""

    def __init__(self, model: Model, *, dtype: torch.dtype = torch.float32):
        self.model = model
        self.ckpt = ckpt = model.checkpoint
        self.adapter = model.adapter
        self.dtype = dtype
        self.hf_config = self._hf_config(ckpt.config)
        self._resized: dict[int, object] = {}     # expert count -> transformers config of that size
        other = ckpt.load_other()
        self.embed_weight = other["model.embed_tokens.weight"].to(dtype)
        head = other.get("lm_head.weight")
        if head is None or ckpt.config.get("tie_word_embeddings"):
            head = other["model.embed_tokens.weight"]
        self.head_weight = head.to(dtype)
        self.norm = self.adapter.norm_class()(ckpt.config["hidden_size"], eps=ckpt.config["rms_norm_eps"])
        self.norm.load_state_dict({"weight": other["model.norm.weight"].to(dtype)})
        self.norm.to(dtype).eval()
        self.rotary = self.adapter.rotary_class()(config=self.hf_config).eval()

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.embed_weight)

    @torch.no_grad()
    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> LayerContext:
        seq = hidden.shape[1]
        position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
        return LayerContext(
            position_ids=position_ids,
            position_embeddings=self.rotary(hidden, position_ids),
            masks=self.adapter.layer_masks(self.hf_config, hidden, position_ids, attention_mask),
        )

    def _hf_config(self, config: dict):
        cfg = self.adapter.hf_config(config)
        cfg.dtype = self.dtype
        return cfg

    def layer(self, index: int, tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Decoder layer ``index`` built from its own tensors (read from the checkpoint by default).

        Given tensors may hold a different number of routed experts than the checkpoint's config (a
        compressed layer); the layer is then built with that many experts, top-k unchanged.
        """
        if tensors is None:
            return self.adapter.build_layer(self.hf_config, index, self.ckpt.load_layer(index), dtype=self.dtype)
        hf_config = self.hf_config
        if any(self.adapter.is_expert_key(k) for k in tensors):
            n = self.adapter.stored_experts(tensors)
            if n != self.adapter.num_experts(self.ckpt.config):
                if n not in self._resized:
                    self._resized[n] = self._hf_config(self.adapter.with_num_experts(self.ckpt.config, n))
                hf_config = self._resized[n]
        return self.adapter.build_layer(hf_config, index, tensors, dtype=self.dtype)

    @torch.no_grad()
    def run_layer(self, layer: nn.Module, index: int, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        out = layer(
            hidden,
            position_embeddings=ctx.position_embeddings,
            attention_mask=ctx.masks[self.adapter.layer_type(self.ckpt.config, index)],
            position_ids=ctx.position_ids,
            past_key_values=None,
        )
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.norm(hidden), self.head_weight)

    # ------------------------------------------------------------------ whole passes
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                on_layer: Callable[[int, nn.Module, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Logits for ``input_ids`` [B, T], loading one decoder layer at a time (a reference pass: the layer
        pass of compression runs the layers itself).

        ``on_layer(index, layer, hidden_in, hidden_out)`` is called after each layer (for observers).
        """
        hidden = self.embed(input_ids)
        ctx = self.context(hidden, attention_mask)
        for i in range(self.ckpt.num_layers):
            layer = self.layer(i)
            out = self.run_layer(layer, i, hidden, ctx)
            if on_layer is not None:
                on_layer(i, layer, hidden, out)
            del layer
            self.ckpt.close()        # unmap the shards: pages the layer touched would otherwise stay resident
            hidden = out
        return self.head(hidden)
