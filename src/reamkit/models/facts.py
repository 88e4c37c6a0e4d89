"""What a family says about its GGUF and its memory: the part of an adapter that sizes, fit, speed and the
MoE-aware ladder ask.

* **GGUF architecture and tensors**: the converter's ``general.architecture`` name for the family, and the
  tensors it writes for a config (names and shapes in ggml order, row length first), so file sizes can be
  predicted before any weights exist -- for instance at a target expert count.
* **Always-active tensors**: regexes naming the GGUF tensors every token passes through (attention, shared
  expert, dense FFN layers, output head); the MoE-aware ladder keeps them at a higher type.
* **Routed and shared tensors** in a GGUF's tensor table (``*_exps`` and ``*_shexp`` by llama.cpp's naming).
* **Memory model**: the layers holding a KV cache, their KV heads and dims, and any recurrent state per
  sequence, from a config or from a GGUF's metadata.

The defaults describe a plain transformer MoE (every layer full attention, optionally a shared expert and some
dense FFN layers), so a simple family states only its GGUF name and what it adds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

Shape = tuple[int, ...]
Meta = Callable[..., object]      # meta(key, default=None): the GGUF's "<arch>.<key>" value


@dataclass(frozen=True)
class Memory:
    """What memory beyond the weights depends on."""

    n_layers: int
    n_full_attn: int                  # layers with a KV cache
    n_kv_heads: int
    k_dim: int
    v_dim: int
    n_linear: int = 0                 # linear-attention (recurrent) layers
    conv_kernel: int = 0
    conv_dim: int = 0
    ssm_state: int = 0                # elements per linear layer
    n_vocab: int = 0
    n_embd: int = 0


ATTENTION = r"\.attn_(q|k|v|output)\.weight$"
SHARED_EXPERT = r"\.ffn_(gate|up|down)_shexp\.weight$"
DENSE_FFN = r"\.ffn_(gate|up|down)\.weight$"
OUTPUT = r"^output\.weight$"


class FamilyFacts:
    """Defaults for a plain transformer MoE; a family overrides what differs."""

    gguf_arch: ClassVar[str] = ""                     # the converter's general.architecture
    gguf_qk_norm: ClassVar[bool] = False              # per-head q/k RMS norms (attn_q_norm, attn_k_norm)
    gguf_qkv_bias: ClassVar[bool] = False             # q/k/v projections carry biases
    gguf_f32: ClassVar[tuple[str, ...]] = ()          # name fragments the converter also keeps in F32
    always_active: ClassVar[tuple[str, ...]] = (ATTENTION, SHARED_EXPERT, DENSE_FFN, OUTPUT)
    shared_expert_size_key: ClassVar[str] = "shared_expert_intermediate_size"

    # ------------------------------------------------------------------ GGUF tensors
    def gguf_tensors(self, config: dict, experts: int) -> list[tuple[str, Shape]]:
        """The converter's tensors for ``config`` with ``experts`` routed experts per MoE layer."""
        c = config
        h, vocab = int(c["hidden_size"]), int(c["vocab_size"])
        out: list[tuple[str, Shape]] = [("token_embd.weight", (h, vocab)), ("output_norm.weight", (h,))]
        if not c.get("tie_word_embeddings", False):
            out.append(("output.weight", (h, vocab)))
        moe = set(self.moe_layers(c))
        for i in range(int(c["num_hidden_layers"])):
            layer = self.gguf_layer(c, i, experts if i in moe else 0)
            out += [(f"blk.{i}.{name}", shape) for name, shape in layer]
        return out

    def gguf_layer(self, c: dict, i: int, experts: int) -> list[tuple[str, Shape]]:
        """Block ``i``'s tensors (relative names); ``experts`` is 0 for a dense FFN layer."""
        h = int(c["hidden_size"])
        out = [("attn_norm.weight", (h,)), ("ffn_norm.weight", (h,))] + self.gguf_attention(c, i)
        return out + (self.gguf_moe(c, experts) if experts else self.gguf_dense_ffn(c))

    def gguf_attention(self, c: dict, i: int) -> list[tuple[str, Shape]]:
        h, n_head, n_kv, hd = heads(c)
        out: list[tuple[str, Shape]] = [("attn_q.weight", (h, n_head * hd)), ("attn_k.weight", (h, n_kv * hd)),
                                        ("attn_v.weight", (h, n_kv * hd)), ("attn_output.weight", (n_head * hd, h))]
        if self.gguf_qkv_bias:
            out += [("attn_q.bias", (n_head * hd,)), ("attn_k.bias", (n_kv * hd,)), ("attn_v.bias", (n_kv * hd,))]
        if self.gguf_qk_norm:
            out += [("attn_q_norm.weight", (hd,)), ("attn_k_norm.weight", (hd,))]
        return out

    def gguf_moe(self, c: dict, n: int) -> list[tuple[str, Shape]]:
        """Router, stacked routed experts ``[ne0, ne1, N]`` and the shared expert with its gate, if any."""
        h, inter = int(c["hidden_size"]), int(c.get("moe_intermediate_size") or c["intermediate_size"])
        out: list[tuple[str, Shape]] = [
            ("ffn_gate_inp.weight", (h, n)), ("ffn_gate_exps.weight", (h, inter, n)),
            ("ffn_up_exps.weight", (h, inter, n)), ("ffn_down_exps.weight", (inter, h, n))]
        shared = int(c.get(self.shared_expert_size_key) or 0) if getattr(self, "shared_expert", None) else 0
        if shared:
            out += [("ffn_gate_shexp.weight", (h, shared)), ("ffn_up_shexp.weight", (h, shared)),
                    ("ffn_down_shexp.weight", (shared, h))]
            if getattr(self, "shared_expert_gate", None):
                out.append(("ffn_gate_inp_shexp.weight", (h, 1)))
        return out

    def gguf_dense_ffn(self, c: dict) -> list[tuple[str, Shape]]:
        h, inter = int(c["hidden_size"]), int(c["intermediate_size"])
        return [("ffn_gate.weight", (h, inter)), ("ffn_up.weight", (h, inter)), ("ffn_down.weight", (inter, h))]

    # ------------------------------------------------------------------ GGUF tensor table
    @staticmethod
    def gguf_routed(name: str) -> bool:
        """A routed-expert tensor (a token reads top-k / N of it)."""
        return "_exps" in name

    @staticmethod
    def gguf_shared(name: str) -> bool:
        """A shared-expert tensor (every token reads all of it)."""
        return "_shexp" in name

    # ------------------------------------------------------------------ memory
    def memory(self, c: dict) -> Memory:
        """KV cache and recurrent state dimensions from a config: by default every layer holds a KV cache."""
        h, _n_head, n_kv, hd = heads(c)
        n = int(c["num_hidden_layers"])
        return Memory(n, n, n_kv, hd, hd, n_vocab=int(c["vocab_size"]), n_embd=h)

    def memory_from_gguf(self, meta: Meta, n_vocab: int) -> Memory:
        """The same from a GGUF's metadata (``meta(key, default)`` reads ``<arch>.<key>``)."""
        n, h = int(meta("block_count")), int(meta("embedding_length"))
        n_head = int(meta("attention.head_count"))
        n_kv = int(meta("attention.head_count_kv", n_head))
        kd = int(meta("attention.key_length", h // n_head))
        vd = int(meta("attention.value_length", kd))
        return Memory(n, n, n_kv, kd, vd, n_vocab=n_vocab, n_embd=h)


def heads(c: dict) -> tuple[int, int, int, int]:
    """hidden size, attention heads, KV heads, head dim."""
    h, n_head = int(c["hidden_size"]), int(c["num_attention_heads"])
    return h, n_head, int(c.get("num_key_value_heads") or n_head), int(c.get("head_dim") or h // n_head)
