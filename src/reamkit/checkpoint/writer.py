"""Write a checkpoint shard by shard, with a correct index, tokenizer files and generation config."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..fsutil import atomic_dir
from .reader import CONFIG, INDEX, SINGLE, Checkpoint

# Files next to the weights that a model folder needs to be usable (tokenizer, chat template, generation).
AUX_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
COPY_CHUNK = 4 << 20        # a shard's data is copied behind its header in chunks of this size (each one a buffer)
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class CheckpointWriter:
    """Accumulate tensors and flush them to numbered shards; publish the folder atomically on close.

    Use as a context manager::

        with CheckpointWriter(out, config=cfg, aux_from=src.path) as w:
            w.add(tensors)            # any number of times, e.g. once per decoder layer
        # out/ now holds config.json, shards, index, tokenizer files -- or nothing if the block failed

    Tensor bytes go to disk as they are added (a shard's data is written to a side file and the safetensors
    header put in front when the shard is full), so memory stays at what the caller holds, however large the
    shards. A shard is closed before a tensor that would push it past ``max_shard_bytes``. Tensor bytes are
    written exactly as given (no dtype change).
    """

    def __init__(self, out_dir: Path, *, config: Mapping, aux_from: Path | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_files: Mapping[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.config = dict(config)
        self.aux_from = Path(aux_from) if aux_from else None
        self.max_shard_bytes = int(max_shard_bytes)
        self.extra_files = dict(extra_files or {})
        self._entries: dict[str, dict] = {}      # the open shard's header entries
        self._data = None                        # the open shard's data side file
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self._seen: set[str] = set()
        self._total = 0
        self._ctx = None
        self._tmp: Path | None = None
        # called with the finished temporary folder just before it is renamed into place; raising stops the
        # publication (e.g. the model's own consistency check)
        self.before_publish: Callable[[Path], None] | None = None

    def __enter__(self) -> "CheckpointWriter":
        self._ctx = atomic_dir(self.out_dir)
        self._tmp = self._ctx.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._finish()
        except BaseException as e:
            self._close_data()
            self._ctx.__exit__(type(e), e, e.__traceback__)
            raise
        self._close_data()
        return bool(self._ctx.__exit__(exc_type, exc, tb))

    def _close_data(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write full-name tensors into the open shard, starting a new one before a tensor that would push it
        past ``max_shard_bytes`` (only a single tensor larger than the limit gets a shard of its own)."""
        if self._tmp is None:
            raise RuntimeError("CheckpointWriter must be used as a context manager")
        for name, t in tensors.items():
            if name in self._seen:
                raise CheckpointError(f"tensor {name!r} written twice")
            nbytes = t.numel() * t.element_size()
            if self._entries and self._buffer_bytes + nbytes > self.max_shard_bytes:
                self.flush()
            self._seen.add(name)
            if self._data is None:
                self._data = open(self._tmp / f"part-{len(self._shards) + 1:05d}.data", "wb")
            flat = t.detach().contiguous().cpu().reshape(-1)
            if nbytes:
                self._data.write(flat.view(torch.uint8).numpy().data)
            self._entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                                   "data_offsets": [self._buffer_bytes, self._buffer_bytes + nbytes]}
            self._buffer_bytes += nbytes
        if self._buffer_bytes >= self.max_shard_bytes:
            self.flush()

    @property
    def staging(self) -> Path:
        """The temporary folder being filled (for extra files that belong with the model)."""
        if self._tmp is None:
            raise RuntimeError("CheckpointWriter must be used as a context manager")
        return self._tmp

    def flush(self) -> None:
        """Close the open shard: header first, then the data copied from the side file in chunks."""
        if not self._entries:
            return
        n = len(self._shards) + 1
        data_path = Path(self._data.name)
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self._tmp / f"part-{n:05d}.safetensors", "wb") as f, open(data_path, "rb") as data:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            shutil.copyfileobj(data, f, COPY_CHUNK)
        data_path.unlink()
        self._shards.append(list(self._entries))
        self._total += self._buffer_bytes
        self._entries, self._data, self._buffer_bytes = {}, None, 0

    def _finish(self) -> None:
        self.flush()
        tmp = self._tmp
        if not self._shards:
            raise CheckpointError("no tensors were written")
        count = len(self._shards)
        if count == 1:
            os.replace(tmp / "part-00001.safetensors", tmp / SINGLE)
        else:
            weight_map: dict[str, str] = {}
            for i, names in enumerate(self._shards, start=1):
                final = f"model-{i:05d}-of-{count:05d}.safetensors"
                os.replace(tmp / f"part-{i:05d}.safetensors", tmp / final)
                weight_map.update({name: final for name in names})
            index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        if self.aux_from is not None:
            for name in AUX_FILES:
                src = self.aux_from / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        for name, text in self.extra_files.items():
            (tmp / name).write_text(text)
        if self.before_publish is not None:
            self.before_publish(tmp)


def write_checkpoint(src: Checkpoint, out_dir: Path, *, config: Mapping | None = None,
                     layers: Iterable[tuple[int, Mapping[str, torch.Tensor]]] | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     extra_files: Mapping[str, str] | None = None) -> Path:
    """Copy ``src`` to ``out_dir`` one decoder layer at a time.

    ``layers`` may supply replacement per-layer tensors (relative names, e.g. from a compression pass);
    by default each layer is read from ``src`` as is. Non-layer tensors (embeddings, norm, head, ``mtp.*``)
    are copied unchanged. The tokenizer files and generation config come along.
    """
    from .reader import layer_prefix

    layers = layers if layers is not None else ((i, src.load_layer(i)) for i in range(src.num_layers))
    with CheckpointWriter(out_dir, config=config or src.config, aux_from=src.path,
                          max_shard_bytes=max_shard_bytes, extra_files=extra_files) as w:
        w.add(src.load_other())
        for i, tensors in layers:
            prefix = layer_prefix(i)
            w.add({prefix + k: v for k, v in tensors.items()})
    return Path(out_dir)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors file tensor by tensor, without the whole-file byte copy
    ``safetensors.torch.save_file`` makes (a decoder layer's worth of memory)."""
    entries, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
