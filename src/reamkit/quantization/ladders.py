"""The two ladders: llama.cpp's stock mixes ("static"), and a MoE-aware one.

The MoE-aware ladder quantizes the routed experts at the ladder's type and keeps the tensors every token
passes through -- attention, linear attention (``attn_qkv``, ``attn_gate``, ``ssm_*``), the shared expert,
dense FFN layers and the output head -- at a higher type (Q8_0 by default). In a 384-expert model those are
about 4% of the weights, so the cost is small and the error they add to every token is removed. Routers and
norms are never quantized by llama.cpp and stay F32 in both ladders.

The overrides are plain ``--tensor-type REGEX=TYPE`` patterns; the size predictor applies the same ones.
"""

from __future__ import annotations

from ..errors import ReamkitError
from .rules import FILE_TYPES, GGML_BLOCKS, LADDER

LADDERS = {"static": "", "moe-aware": "-moe"}       # ladder -> file name suffix after the type
ALWAYS_ACTIVE = (
    r"\.attn_(q|k|v|qkv|output|gate)\.weight$",    # attention; linear attention's qkv and z gate
    r"\.ssm_[a-z0-9_]+\.weight$",                   # linear attention's other projections (ssm_ba, ssm_out)
    r"\.ffn_(gate|up|down)_shexp\.weight$",         # shared expert
    r"\.ffn_(gate|up|down)\.weight$",               # dense FFN layers
    r"^output\.weight$",                            # output head
)
KEEP_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K")


def nominal_bpw(ggml_type: str) -> float:
    block, size = GGML_BLOCKS[ggml_type]
    return size * 8 / block


def ladder_overrides(ladder: str, file_type: str, keep_type: str = "Q8_0") -> list[tuple[str, str]]:
    """``(regex, ggml type)`` overrides for ``file_type`` on ``ladder`` (never lowering a tensor's type)."""
    if ladder == "static":
        return []
    if keep_type not in KEEP_TYPES:
        raise ReamkitError(f"unknown keep type {keep_type!r}; choose one of: {', '.join(KEEP_TYPES)}")
    if nominal_bpw(keep_type) <= nominal_bpw(FILE_TYPES[file_type][1]):
        return []
    return [(p, keep_type) for p in ALWAYS_ACTIVE]


def parse_types(types: list[str] | str | None) -> list[str]:
    """Ladder types by name (case-insensitive, comma-separated allowed); unknown names are one clear error."""
    if types is None:
        return list(LADDER)
    if isinstance(types, str):
        types = [types]
    names = [n.strip().upper() for item in types for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in FILE_TYPES]
    if unknown:
        raise ReamkitError(f"unknown quantization type {', '.join(unknown)}; choose from: {', '.join(LADDER)}")
    if not names:
        raise ReamkitError("no quantization type given")
    return list(dict.fromkeys(names))
