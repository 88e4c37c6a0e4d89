"""Compression methods, one file each. A method turns one layer's statistics into a :class:`LayerPlan`.

Each module defines ``NAME``, ``SEQUENTIAL`` (whether the next layer's statistics are computed on the
outputs of the *compressed* layer, as REAM does, or of the original one, as REAP does), ``NEEDS`` (which
per-token statistics it needs: ``logits``, ``activations``) and ``plan_layer(inp) -> LayerPlan``; a method
that scores plans on held-out calibration batches also defines ``holdout(options) -> fraction`` (0: none).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType

from ...errors import ReamkitError
from ...models.moe import MoEBlock
from ..observe import ExpertStats
from . import auto, frequency, hc_smoe, m_smoe, ream, reap


@dataclass
class MethodInput:
    stats: ExpertStats
    block: MoEBlock
    keep: int                                   # experts kept in this layer
    options: dict = field(default_factory=dict)  # method options (see each module's DEFAULTS)
    sequences: int | None = None                # calibration sequences (REAM reference saliency)
    heldout: list | None = None                 # MoE inputs [T, H] of batches the statistics never saw
    cache: dict | None = None                   # shared by the candidate plans of one layer (auto)
    moe_inputs: Callable[[], Iterable] | None = None   # replays the observed batches' MoE inputs [T, H]


METHODS: dict[str, ModuleType] = {m.NAME: m for m in (ream, reap, frequency, hc_smoe, m_smoe, auto)}


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


def holdout_fraction(mod: ModuleType, options: dict) -> float:
    """The share of calibration batches the method keeps out of its statistics to score plans on."""
    return float(mod.holdout(options)) if hasattr(mod, "holdout") else 0.0


__all__ = ["METHODS", "MethodInput", "get_method", "holdout_fraction", "method_options"]
