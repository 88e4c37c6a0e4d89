"""Calibration: stream activations through a model one loaded decoder layer at a time."""

from .stream import LayerContext, LayerwiseModel

__all__ = ["LayerContext", "LayerwiseModel"]
