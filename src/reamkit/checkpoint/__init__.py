"""Checkpoint I/O: stream a Hugging Face model folder one decoder layer at a time, and write one back.

Reading never loads the whole model: tensors are memory-mapped from their safetensors shard on demand.
Writing fills shards one at a time into a temporary folder that is renamed into place at the end.
"""

from .reader import Checkpoint, TensorInfo
from .writer import CheckpointWriter, write_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "CheckpointWriter", "write_checkpoint"]
