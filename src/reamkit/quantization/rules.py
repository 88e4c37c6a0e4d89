"""llama.cpp's quantization type rules, as data, for the pinned commit (0c1e57098, ``src/llama-quant.cpp``).

One module holds every fact about which ggml type each tensor gets, so the quantizer driver (which names the
file types and writes per-tensor overrides) and the size predictor (which emulates the choice without weights)
can never disagree. The emulation follows ``llama_tensor_get_type`` step by step:

1. tensors the quantizer never touches keep their type (:func:`quantizable`);
2. a user override pattern (``--tensor-type REGEX=TYPE``, first match wins) bypasses the mix logic;
3. otherwise the file type's mix (:data:`MIX_RULES`) may lift a tensor above the base type;
4. a row length that is not a multiple of the type's block falls back (:data:`FALLBACK`), or to F16.

Tensors are visited in the loader's order (layer number, then name), because the ``attn_v``-like rules count
tensors as they go. Only the types reamkit offers are tabled; others are refused before any work.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# ggml type -> (elements per block, bytes per block); gguf-py GGML_QUANT_SIZES at the pinned commit
GGML_BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "IQ4_NL": (32, 18),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "IQ4_XS": (256, 136),
}

# llama-quantize file type -> (LLAMA_FTYPE id, base ggml type)
FILE_TYPES: dict[str, tuple[int, str]] = {
    "Q2_K": (10, "Q2_K"), "Q3_K_S": (11, "Q3_K"), "Q3_K_M": (12, "Q3_K"), "Q3_K_L": (13, "Q3_K"),
    "IQ4_XS": (30, "IQ4_XS"), "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"), "Q5_K_S": (16, "Q5_K"),
    "Q5_K_M": (17, "Q5_K"), "Q6_K": (18, "Q6_K"), "Q8_0": (7, "Q8_0"),
}
LADDER: tuple[str, ...] = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S",
                           "Q5_K_M", "Q6_K", "Q8_0")
REFERENCE_TYPES: dict[str, int] = {"F32": 0, "F16": 1, "BF16": 32}   # unquantized references: file type ids

# row length not a multiple of the block -> this type (tensor_type_fallback)
FALLBACK: dict[str, str] = {"IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
                            "Q6_K": "Q8_0"}

# tensor_allows_quantization: name fragments that are never quantized (besides 1-D tensors and non-"weight")
NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                   "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "time_mix_", "attn_rel_b.weight",
                   "position_embd", "token_types.weight")

# tensor_get_category: exact names first, then the first substring that occurs
EXACT_CATEGORIES = {"output.weight": "output", "token_embd.weight": "token_embd",
                    "per_layer_token_embd.weight": "token_embd"}
SUBSTRING_CATEGORIES = (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                        ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                        ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                        ("ffn_down", "ffn_down"))

# The mixes: per file type and category, (condition, type) pairs; the first true condition picks the type,
# none keeps the base type. Conditions are named in CONDITIONS below. "attn_v" covers attn_v/attn_qkv/attn_kv_b
# ("wv" is their running count); "layer" is the block number parsed from the name, "n" the block count.
_MIXTRAL_ATTN = {"attn_v": (("experts==8", "Q8_0"),)}
MIX_RULES: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "Q2_K": {"attn_v": (("experts==8", "Q8_0"), ("gqa>=4", "Q4_K"), ("always", "Q3_K")),
             "ffn_down": (("always", "Q3_K"),),
             "attn_output": (("experts==8", "Q5_K"), ("always", "Q3_K"))},
    "Q3_K_S": {**_MIXTRAL_ATTN, "attn_output": (("experts==8", "Q5_K"),)},
    "Q3_K_M": {"attn_v": (("experts==8", "Q8_0"), ("wv<2", "Q5_K"), ("always", "Q4_K")),
               "ffn_down": (("layer<n/16", "Q5_K"), ("always", "Q4_K")),
               "attn_output": (("experts==8", "Q5_K"), ("always", "Q4_K"))},
    "Q3_K_L": {"attn_v": (("experts==8", "Q8_0"), ("always", "Q5_K")), "ffn_down": (("always", "Q5_K"),),
               "attn_output": (("experts!=8", "Q5_K"),)},
    "IQ4_XS": {"attn_v": (("experts==8", "Q8_0"), ("gqa>=4", "Q5_K")),
               "ffn_down": (("layer<n/8 without imatrix", "Q5_K"),),
               "attn_output": (("experts==8", "Q5_K"),)},
    "Q4_K_S": {"attn_v": (("experts==8", "Q8_0"), ("wv<4", "Q5_K")), "ffn_down": (("layer<n/8", "Q5_K"),),
               "attn_output": (("experts==8", "Q5_K"),)},
    "Q4_K_M": {"attn_v": (("experts==8", "Q8_0"), ("more_bits(wv)", "Q6_K")),
               "ffn_down": (("more_bits(layer)", "Q6_K"),), "attn_output": (("experts==8", "Q5_K"),)},
    "Q5_K_S": dict(_MIXTRAL_ATTN),
    "Q5_K_M": {"attn_v": (("experts==8", "Q8_0"), ("more_bits(wv)", "Q6_K")),
               "ffn_down": (("more_bits(layer)", "Q6_K"),)},
    "Q6_K": dict(_MIXTRAL_ATTN),
    "Q8_0": dict(_MIXTRAL_ATTN),
}
for _rules in MIX_RULES.values():   # every mix: 8-expert models (Mixtral) keep attn_k at Q8_0
    _rules["attn_k"] = (("experts==8", "Q8_0"),)


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


CONDITIONS = {
    "always": lambda c: True,
    "experts==8": lambda c: c.n_expert == 8,
    "experts!=8": lambda c: c.n_expert != 8,
    "gqa>=4": lambda c: c.gqa >= 4,
    "wv<2": lambda c: c.i_wv < 2,
    "wv<4": lambda c: c.i_wv < 4,
    "more_bits(wv)": lambda c: _more_bits(c.i_wv, c.n_wv),
    "layer<n/8": lambda c: c.layer < c.n_layer // 8,
    "layer<n/16": lambda c: c.layer < c.n_layer // 16,
    "layer<n/8 without imatrix": lambda c: c.layer < c.n_layer // 8 and not c.has_imatrix,
    "more_bits(layer)": lambda c: _more_bits(c.layer, c.n_layer),
}


@dataclass(frozen=True)
class Tensor:
    """One GGUF tensor: name, shape in ggml order (ne0 = row length first) and type."""

    name: str
    shape: tuple[int, ...]
    type: str

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelFacts:
    """The hyperparameters the mixes look at."""

    n_layer: int       # block count, including any MTP blocks
    n_expert: int
    n_head: int
    n_head_kv: int

    @property
    def gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


@dataclass
class _Ctx:
    n_layer: int
    n_expert: int
    gqa: int
    has_imatrix: bool
    n_wv: int
    i_wv: int = 0
    layer: int = 0
    i_ffn: dict = field(default_factory=lambda: {"ffn_down": 0, "ffn_gate": 0, "ffn_up": 0})


def tensor_bytes(type_name: str, shape: Sequence[int]) -> int:
    block, size = GGML_BLOCKS[type_name]
    n_rows = 1
    for d in shape[1:]:
        n_rows *= d
    return n_rows * (shape[0] // block) * size


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing 1s do not count."""
    dims = len(shape)
    while dims > 1 and shape[dims - 1] == 1:
        dims -= 1
    return dims


def quantizable(t: Tensor) -> bool:
    return (n_dims(t.shape) >= 2 and t.name.endswith("weight")
            and not any(frag in t.name for frag in NEVER_QUANTIZED))


def category(name: str) -> str:
    if name in EXACT_CATEGORIES:
        return EXACT_CATEGORIES[name]
    for fragment, cat in SUBSTRING_CATEGORIES:
        if fragment in name:
            return cat
    return "other"


def loader_order(tensors: Iterable[Tensor]) -> list[Tensor]:
    """The order llama.cpp's loader visits tensors in: block number (none first), then name."""
    def key(t: Tensor) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", t.name)
        return (int(m.group(1)) if m else -1, t.name)
    return sorted(tensors, key=key)


def _fallback(t: Tensor, type_name: str) -> str:
    block = GGML_BLOCKS[type_name][0]
    if t.shape[0] % block == 0:
        return type_name
    type_name = FALLBACK.get(type_name, type_name)
    return type_name if t.shape[0] % GGML_BLOCKS[type_name][0] == 0 else "F16"


def choose_types(tensors: Iterable[Tensor], file_type: str, facts: ModelFacts, *,
                 overrides: Sequence[tuple[str, str]] = (), has_imatrix: bool = False) -> dict[str, str]:
    """The ggml type llama-quantize gives each tensor for ``file_type``: ``{name: type}``.

    ``overrides`` are ``(regex, type)`` pairs as passed to ``--tensor-type`` (searched, first match wins).
    """
    base = FILE_TYPES[file_type][1]
    ordered = loader_order(tensors)
    names = {t.name for t in ordered}
    tied = "output.weight" not in names
    ctx = _Ctx(n_layer=facts.n_layer, n_expert=facts.n_expert, gqa=facts.gqa, has_imatrix=has_imatrix,
               n_wv=sum(category(t.name) == "attn_v" for t in ordered))
    compiled = [(re.compile(p), ty) for p, ty in overrides]
    rules = MIX_RULES[file_type]
    out: dict[str, str] = {}
    for t in ordered:
        if not quantizable(t):
            out[t.name] = t.type
            continue
        manual = next((ty for rx, ty in compiled if rx.search(t.name)), None)
        new = manual if manual is not None else _mix(t, base, file_type, tied, ctx, rules)
        out[t.name] = _fallback(t, new)
    return out


def _mix(t: Tensor, base: str, file_type: str, tied: bool, ctx: _Ctx, rules: dict) -> str:
    cat = category(t.name)
    if cat == "output" or (tied and cat == "token_embd"):
        if t.shape[0] % GGML_BLOCKS[base][0] != 0:
            return "Q8_0"
        return base if base == "Q8_0" else "Q6_K"
    if cat == "token_embd":
        return base
    if cat in ("ffn_down", "ffn_gate", "ffn_up"):
        # MoE models: the block number in the name; dense ones: a running count per category
        m = re.match(r"blk\.(\d+)\.", t.name)
        ctx.layer = int(m.group(1)) if ctx.n_expert > 1 and m else ctx.i_ffn[cat]
        ctx.i_ffn[cat] += 1
    new = base
    for cond, ty in rules.get(cat, ()):
        if CONDITIONS[cond](ctx):
            new = ty
            break
    if cat == "attn_v":
        ctx.i_wv += 1
    return new


def file_bpw(total_bytes: int, n_elements: int) -> float:
    return total_bytes * 8 / n_elements if n_elements else 0.0
