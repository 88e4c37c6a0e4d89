"""Architecture adapters, one small file per model family."""

from __future__ import annotations

from ..errors import UnsupportedArchitectureError
from .base import Adapter, Experts, Routing
from .mixtral import MixtralAdapter
from .model import Model, open_model
from .qwen3_moe import Qwen3MoeAdapter
from .qwen3_next import Qwen3NextAdapter

ADAPTERS: dict[str, type[Adapter]] = {a.model_type: a for a in (Qwen3NextAdapter, Qwen3MoeAdapter, MixtralAdapter)}


def get_adapter(config_or_type: dict | str) -> Adapter:
    """The adapter for a config (or model_type); a clear error lists the supported families."""
    model_type = config_or_type if isinstance(config_or_type, str) else config_or_type.get("model_type")
    cls = ADAPTERS.get(str(model_type))
    if cls is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return cls()


__all__ = ["ADAPTERS", "Adapter", "Experts", "Model", "Routing", "get_adapter", "open_model"]
