"""The layer-at-a-time runtime: run a model of any size with one decoder layer in memory at a time."""

from .layerwise import LayerContext, LayerwiseModel

__all__ = ["LayerContext", "LayerwiseModel"]
