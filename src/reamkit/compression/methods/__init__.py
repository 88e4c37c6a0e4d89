"""Compression methods, one file each. A method turns one layer's statistics into a :class:`LayerPlan`.

Each module defines ``NAME``, ``SEQUENTIAL`` (whether the next layer's statistics are computed on the
outputs of the *compressed* layer, as REAM does, or of the original one, as REAP does), ``NEEDS`` (which
per-token statistics it needs: ``logits``, ``activations``) and ``plan_layer(inp) -> LayerPlan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

from ...errors import ReamkitError
from ...models.moe import MoEBlock
from ..observe import ExpertStats
from . import frequency, hc_smoe, m_smoe, ream, reap


@dataclass
class MethodInput:
    stats: ExpertStats
    block: MoEBlock
    keep: int                                   # experts kept in this layer
    options: dict = field(default_factory=dict)  # method options (see each module's DEFAULTS)
    sequences: int | None = None                # calibration sequences (REAM reference saliency)


METHODS: dict[str, ModuleType] = {m.NAME: m for m in (ream, reap, frequency, hc_smoe, m_smoe)}


def get_method(name: str) -> ModuleType:
    if name not in METHODS:
        raise ReamkitError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def method_options(name: str, given: dict) -> dict:
    """The method's defaults updated with ``given``; an unknown option is a one-line error."""
    mod = get_method(name)
    unknown = set(given) - set(mod.DEFAULTS)
    if unknown:
        raise ReamkitError(f"method {name} has no option {sorted(unknown)[0]!r}; "
                           f"its options: {', '.join(mod.DEFAULTS) or 'none'}")
    return {**mod.DEFAULTS, **given}


__all__ = ["METHODS", "MethodInput", "get_method", "method_options"]
