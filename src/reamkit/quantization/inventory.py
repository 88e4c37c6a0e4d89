"""The tensors of a model's GGUF, from its ``config.json`` alone or read from a GGUF file.

From a config, the list emulates what the pinned converter writes (modern qwen3next layout with ``attn_qkv`` +
``attn_gate``, no MTP block, stacked 3-D experts ``[ne0, ne1, N]``), so sizes can be predicted before any
weights exist -- for instance for a target expert count. Shapes are in ggml order (row length first).
Tensors the converter keeps in F32 (norms, routers, ``ssm_conv1d``, 1-D tensors) are F32; the rest are the
reference type (F16/BF16).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ReamkitError
from ..llamacpp.gguf_file import open_gguf, read_field
from .rules import ModelFacts, Tensor

GGUF_ARCH = {"qwen3_next": "qwen3next", "qwen3_moe": "qwen3moe", "mixtral": "llama"}
_F32_FRAGMENTS = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")


@dataclass(frozen=True)
class Inventory:
    arch: str                 # GGUF architecture name
    tensors: tuple[Tensor, ...]
    facts: ModelFacts
    header_bytes: int = 0     # a GGUF's header incl. padding (where its tensor data starts); 0 from a config

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)


def experts_in(config: dict) -> int:
    return int(config.get("num_experts") or config.get("num_local_experts") or 0)


def inventory_from_config(config: dict, *, experts: int | None = None, ref_type: str = "F16") -> Inventory:
    """The converter's tensors for ``config`` (optionally with the expert count set to ``experts``)."""
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCH:
        raise ReamkitError(f"cannot predict GGUF sizes for model_type={model_type!r}; "
                           f"supported: {', '.join(sorted(GGUF_ARCH))}")
    c = dict(config)
    n_exp = experts if experts is not None else experts_in(c)
    if n_exp < 1:
        raise ReamkitError(f"the expert count must be at least 1, not {n_exp}")
    h, n_layer, vocab = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["vocab_size"])
    n_head = int(c["num_attention_heads"])
    n_kv = int(c.get("num_key_value_heads") or n_head)
    hd = int(c.get("head_dim") or h // n_head)
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (h, vocab)), ("output_norm.weight", (h,))]
    if not c.get("tie_word_embeddings", False):
        shapes.append(("output.weight", (h, vocab)))
    for i in range(n_layer):
        if model_type == "qwen3_next":
            layer = _qwen3_next_layer(c, i, h, n_head, n_kv, hd, n_exp)
        else:
            layer = [("attn_norm.weight", (h,)), ("ffn_norm.weight", (h,)), ("attn_q.weight", (h, n_head * hd)),
                     ("attn_k.weight", (h, n_kv * hd)), ("attn_v.weight", (h, n_kv * hd)),
                     ("attn_output.weight", (n_head * hd, h))]
            if model_type == "qwen3_moe":
                layer += [("attn_q_norm.weight", (hd,)), ("attn_k_norm.weight", (hd,))]
            if _is_moe_layer(c, i):
                layer += _experts(h, int(c.get("moe_intermediate_size") or c["intermediate_size"]), n_exp)
            else:
                inter = int(c["intermediate_size"])
                layer += [("ffn_gate.weight", (h, inter)), ("ffn_up.weight", (h, inter)),
                          ("ffn_down.weight", (inter, h))]
        shapes += [(f"blk.{i}.{name}", shape) for name, shape in layer]
    tensors = tuple(Tensor(n, s, _converter_type(n, s, ref_type)) for n, s in shapes)
    facts = ModelFacts(n_layer=n_layer, n_expert=n_exp, n_head=n_head, n_head_kv=n_kv)
    return Inventory(arch=GGUF_ARCH[model_type], tensors=tensors, facts=facts)


def _is_moe_layer(c: dict, i: int) -> bool:
    if c.get("model_type") == "mixtral":
        return True
    step = int(c.get("decoder_sparse_step") or 1)
    return i not in (c.get("mlp_only_layers") or []) and (i + 1) % step == 0


def _experts(h: int, inter: int, n: int) -> list[tuple[str, tuple[int, ...]]]:
    return [("ffn_gate_inp.weight", (h, n)), ("ffn_gate_exps.weight", (h, inter, n)),
            ("ffn_up_exps.weight", (h, inter, n)), ("ffn_down_exps.weight", (inter, h, n))]


def _qwen3_next_layer(c: dict, i: int, h: int, n_head: int, n_kv: int, hd: int, n_exp: int) -> list:
    types = c.get("layer_types")
    full = types[i] == "full_attention" if types else (i + 1) % int(c.get("full_attention_interval") or 4) == 0
    out: list[tuple[str, tuple[int, ...]]] = [("attn_norm.weight", (h,)), ("post_attention_norm.weight", (h,))]
    if full:
        out += [("attn_q.weight", (h, 2 * n_head * hd)), ("attn_k.weight", (h, n_kv * hd)),
                ("attn_v.weight", (h, n_kv * hd)), ("attn_output.weight", (n_head * hd, h)),
                ("attn_q_norm.weight", (hd,)), ("attn_k_norm.weight", (hd,))]
    else:
        nk, dk = int(c["linear_num_key_heads"]), int(c["linear_key_head_dim"])
        nv, dv = int(c["linear_num_value_heads"]), int(c["linear_value_head_dim"])
        conv = 2 * nk * dk + nv * dv
        out += [("ssm_a", (nv,)), ("ssm_dt.bias", (nv,)), ("ssm_conv1d.weight", (int(c["linear_conv_kernel_dim"]), conv)),
                ("ssm_ba.weight", (h, 2 * nv)), ("attn_qkv.weight", (h, conv)), ("attn_gate.weight", (h, nv * dv)),
                ("ssm_norm.weight", (dv,)), ("ssm_out.weight", (nv * dv, h))]
    out += _experts(h, int(c["moe_intermediate_size"]), n_exp)
    shared = int(c.get("shared_expert_intermediate_size") or 0)
    if shared:
        out += [("ffn_gate_shexp.weight", (h, shared)), ("ffn_up_shexp.weight", (h, shared)),
                ("ffn_down_shexp.weight", (shared, h)), ("ffn_gate_inp_shexp.weight", (h, 1))]
    return out


def _converter_type(name: str, shape: tuple[int, ...], ref_type: str) -> str:
    if len(shape) <= 1 or shape[-1] == 1 and len(shape) == 2 or not name.endswith(".weight"):
        return "F32"
    return "F32" if any(f in name for f in _F32_FRAGMENTS) else ref_type


def inventory_from_gguf(path: Path) -> Inventory:
    """The tensors and hyperparameters of a GGUF file (header only; the data is not read)."""
    reader = open_gguf(path)
    arch = read_field(reader, "general.architecture")
    n_layer = int(read_field(reader, f"{arch}.block_count"))
    n_head = int(read_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(read_field(reader, f"{arch}.attention.head_count_kv", n_head))
    n_exp = int(read_field(reader, f"{arch}.expert_count", 0))
    tensors = tuple(Tensor(t.name, tuple(int(d) for d in t.shape), t.tensor_type.name) for t in reader.tensors)
    return Inventory(arch=arch, tensors=tensors, header_bytes=int(reader.data_offset),
                     facts=ModelFacts(n_layer=n_layer, n_expert=n_exp, n_head=n_head, n_head_kv=n_kv))
