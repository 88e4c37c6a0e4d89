"""HF checkpoint -> GGUF, through the pinned llama.cpp converter."""

from .convert import GGUF_DTYPES, convert_to_gguf

__all__ = ["GGUF_DTYPES", "convert_to_gguf"]
