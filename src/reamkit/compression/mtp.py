"""Qwen3-Next's multi-token-prediction (MTP) block, as the compression pass sees it.

The block (``mtp.*`` in Hub checkpoints; transformers does not load it) predicts token t+2 at position t
from two inputs: the main model's final hidden state h_t after its last norm (``model.norm``), and the
embedding of token t+1. As llama.cpp's Qwen3-Next MTP graph and vLLM's Qwen3NextMTP compute it:

    x_t = fc( concat( pre_fc_norm_embedding(embed(ids[t+1])), pre_fc_norm_hidden(norm(h_t)) ) )

then one full-attention decoder layer (with its own MoE, ``mtp.layers.0.``), then ``mtp.norm`` and the shared
head. For calibration every sequence of T tokens gives T-1 MTP positions. The MTP decoder layer has the decoder
layers' tensor names and shapes, so it is observed, planned and compressed exactly like one of them.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

FC, NORM_EMB, NORM_HID = "mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight"


class MTPInput:
    """Builds the MTP decoder layer's input from the main model's last hidden states and the token ids."""

    def __init__(self, lw, dtype: torch.dtype, device: torch.device):
        w = lw.model.checkpoint.load([FC, NORM_EMB, NORM_HID])
        cfg = lw.model.config
        self.lw = lw
        self.fc = w[FC].to(device=device, dtype=dtype)
        self.norm_emb = self._norm(cfg, w[NORM_EMB], dtype, device)
        self.norm_hid = self._norm(cfg, w[NORM_HID], dtype, device)

    @staticmethod
    def _norm(cfg: dict, weight: torch.Tensor, dtype, device):
        from ..models import get_adapter

        norm = get_adapter(cfg).norm_class()(cfg["hidden_size"], eps=cfg["rms_norm_eps"])
        norm.load_state_dict({"weight": weight.to(dtype)})
        return norm.to(device=device, dtype=dtype).eval()

    @torch.no_grad()
    def __call__(self, last_hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``last_hidden`` [B, T, H] (before the final norm), ``ids`` [B, T] -> MTP layer input [B, T-1, H]."""
        h = self.lw.norm(last_hidden)[:, :-1]
        e = self.lw.embed(ids[:, 1:].to(last_hidden.device))
        return F.linear(torch.cat([self.norm_emb(e), self.norm_hid(h)], dim=-1), self.fc)


def build_index(adapter, config: dict) -> int:
    """A decoder-layer index of full-attention type: the MTP layer is built as one (its own index is past
    the last layer, which the per-layer config lists do not cover)."""
    for i in reversed(range(int(config["num_hidden_layers"]))):
        if adapter.layer_type(config, i) == "full_attention":
            return i
    return int(config["num_hidden_layers"]) - 1
