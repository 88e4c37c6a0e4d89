"""GGUF quantization: the type ladders, the importance matrix and the size predictor.

llama.cpp's per-tensor type rules live as data in :mod:`.rules`, used by both the quantizer driver and the
predictor, so a predicted size and a produced file cannot disagree.
"""

from .ladders import LADDERS, parse_types
from .quantize import QuantizeOptions, QuantizeResult, Variant, prepare_reference, quantize_model, variants_table
from .rules import LADDER
from .sizes import SizeRow, predict_sizes, rows_as_dicts, sizes_table

__all__ = ["LADDER", "LADDERS", "QuantizeOptions", "QuantizeResult", "SizeRow", "Variant", "parse_types",
           "predict_sizes", "prepare_reference", "quantize_model", "rows_as_dicts", "sizes_table", "variants_table"]
