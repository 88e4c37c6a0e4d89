"""Expert compression: REAM merging, REAP / frequency pruning, and the HC-SMoE / M-SMoE merging baselines,
computed in one streamed pass over the decoder layers (:func:`compress`)."""

from .driver import CompressOptions, CompressResult, compress
from .methods import METHODS

__all__ = ["METHODS", "CompressOptions", "CompressResult", "compress"]
