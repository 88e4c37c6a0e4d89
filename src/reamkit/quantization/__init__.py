"""GGUF quantization: the type ladders, the importance matrix and the size predictor.

llama.cpp's per-tensor type rules live as data in :mod:`.rules`, used by both the quantizer driver and the
predictor, so a predicted size and a produced file cannot disagree.
"""

from .ladders import LADDERS, parse_types
from .rules import LADDER
from .sizes import SizeRow, predict_sizes

__all__ = ["LADDER", "LADDERS", "SizeRow", "parse_types", "predict_sizes"]
