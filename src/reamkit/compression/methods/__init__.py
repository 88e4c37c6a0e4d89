"""Compression methods, one file each: a :class:`Method` that turns one layer's observations into a
:class:`LayerPlan`, with its options as a pydantic model (:mod:`.base`). :data:`METHODS` is the registry,
keyed by name; a new method is one file defining a ``Method`` subclass, listed here.
"""

from __future__ import annotations

from ...errors import ReamkitError
from .base import Method, MethodInput, MethodOptions
from .auto import Auto
from .frequency import Frequency
from .hc_smoe import HCSMoE
from .m_smoe import MSMoE
from .ream import Ream
from .reap import Reap

METHODS: dict[str, Method] = {m.name: m for m in (Ream(), Reap(), Frequency(), HCSMoE(), MSMoE(), Auto())}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ReamkitError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def method_options(name: str, given: dict | None = None) -> MethodOptions:
    """The method's options: its defaults updated with ``given``, validated (a bad option is a one-line error)."""
    return get_method(name).options(given)


__all__ = ["METHODS", "Method", "MethodInput", "MethodOptions", "get_method", "method_options"]
