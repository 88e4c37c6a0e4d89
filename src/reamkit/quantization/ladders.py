"""The two ladders: llama.cpp's stock mixes ("static"), and a MoE-aware one.

The MoE-aware ladder quantizes the routed experts at the ladder's type and keeps the tensors every token
passes through -- attention, linear attention (``attn_qkv``, ``attn_gate``, ``ssm_*``), the shared expert,
dense FFN layers and the output head, as each family's adapter names them -- at a higher type (Q8_0 by
default). In a 384-expert model those are about 4% of the weights, so the cost is small and the error they add
to every token is removed. Routers and norms are never quantized by llama.cpp and stay F32 in both ladders.

The overrides are plain ``--tensor-type REGEX=TYPE`` patterns; the size predictor applies the same ones. Given
the model's tensors, they name each always-active tensor whose stock type has fewer bits than the keep type, and
no other: a tensor the stock mix already gives more bits (``output.weight`` at Q6_K in Q4_K_M, with keep type
Q5_K) keeps them, so a ``-moe`` file never has a tensor below the same tensor of the stock file.
"""

from __future__ import annotations

import re

from ..errors import ReamkitError
from .rules import FILE_TYPES, GGML_BLOCKS, LADDER, choose_types, quantizable

LADDERS = {"static": "", "moe-aware": "-moe"}       # ladder -> file name suffix after the type
KEEP_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K")


def always_active(arch: str | None = None) -> tuple[str, ...]:
    """The always-active tensor patterns of the family a GGUF architecture names (each family's adapter states
    them); without one, those of every family."""
    from ..models import ADAPTERS, gguf_family

    if arch is not None:
        return gguf_family(arch).always_active
    return tuple(dict.fromkeys(p for a in ADAPTERS.values() for p in a.always_active))


def __getattr__(name: str):
    if name == "ALWAYS_ACTIVE":          # every family's patterns, computed when first asked for
        return always_active()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def nominal_bpw(ggml_type: str) -> float:
    block, size = GGML_BLOCKS[ggml_type]
    return size * 8 / block


def ladder_overrides(ladder: str, file_type: str, keep_type: str = "Q8_0", *, tensors=None, facts=None,
                     has_imatrix: bool = False, arch: str | None = None) -> list[tuple[str, str]]:
    """``(regex, ggml type)`` overrides for ``file_type`` on ``ladder``, never lowering a tensor's type.

    With ``tensors`` and ``facts`` (the model's inventory), one exact-name override per always-active tensor that
    the stock mix gives fewer bits than ``keep_type``; without them, the patterns (for the keep type's check).
    ``arch`` (the inventory's GGUF architecture) picks its family's always-active patterns."""
    if ladder == "static":
        return []
    if keep_type not in KEEP_TYPES:
        raise ReamkitError(f"unknown keep type {keep_type!r}; choose one of: {', '.join(KEEP_TYPES)}")
    if tensors is None:
        return [(p, keep_type) for p in always_active(arch)]
    # every always-active tensor is pinned, to the higher of its stock type and the keep type: a tensor left to
    # the mix would see llama.cpp's per-category counters (attn_v's "more bits" layers) shifted by the pinned ones
    active = [re.compile(p) for p in always_active(arch)]
    stock = choose_types(tensors, file_type, facts, has_imatrix=has_imatrix)
    keep = nominal_bpw(keep_type)
    return [(f"^{re.escape(t.name)}$", stock[t.name] if nominal_bpw(stock[t.name]) >= keep else keep_type)
            for t in tensors if quantizable(t) and any(rx.search(t.name) for rx in active)]


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
