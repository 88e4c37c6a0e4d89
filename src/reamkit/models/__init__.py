"""Architecture adapters, one small file per model family.

Every module of this package is imported once, and each :class:`Adapter` subclass with a ``model_type`` it
defines is a supported family: adding a family is adding its file (and a zoo entry to test it), nothing here.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import UnsupportedArchitectureError
from .base import Adapter, Experts, Routing
from .model import Model, open_model


def _discover() -> dict[str, type[Adapter]]:
    found: dict[str, type[Adapter]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Adapter) and obj.__module__ == module.__name__
                    and "model_type" in vars(obj)):
                if obj.model_type in found:
                    raise RuntimeError(f"two adapters claim model_type {obj.model_type!r}: "
                                       f"{found[obj.model_type].__name__} and {obj.__name__}")
                found[obj.model_type] = obj
    return dict(sorted(found.items()))


ADAPTERS: dict[str, type[Adapter]] = _discover()
GGUF_FAMILIES: dict[str, type[Adapter]] = {a.gguf_arch: a for a in ADAPTERS.values() if a.gguf_arch}


def get_adapter(config_or_type: dict | str) -> Adapter:
    """The adapter for a config (or model_type); a clear error lists the supported families."""
    model_type = config_or_type if isinstance(config_or_type, str) else config_or_type.get("model_type")
    cls = ADAPTERS.get(str(model_type))
    if cls is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return cls()


def gguf_family(arch: str) -> Adapter:
    """The adapter of the family a GGUF's ``general.architecture`` names; for another architecture the base
    adapter, whose GGUF and memory facts describe a plain transformer (every layer full attention)."""
    return GGUF_FAMILIES.get(arch, Adapter)()


__all__ = ["ADAPTERS", "Adapter", "Experts", "GGUF_FAMILIES", "Model", "Routing", "get_adapter", "gguf_family",
           "open_model"]
