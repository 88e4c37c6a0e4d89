"""Open a Hugging Face model folder (or Hub repo id) and stream its tensors layer by layer."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .safetensors_header import HeaderEntry, read_header

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
HUB_PREFIX = "hf:"     # ``hf:org/name`` names a Hugging Face Hub repo; anything else is a local path
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."


class Checkpoint:
    """A safetensors checkpoint opened for streaming. Nothing is loaded until asked for.

    ``tensors`` maps every tensor name to its shard, dtype and shape (from the headers alone).
    ``load_layer(i)`` memory-maps decoder layer ``i``'s tensors and returns them keyed relative to the
    layer (``mlp.gate.weight``); ``load(names)`` does the same for any full names.
    """

    def __init__(self, path: Path, config: dict, tensors: dict[str, TensorInfo]):
        self.path = Path(path)
        self.config = config
        self.tensors = tensors
        self._handles: dict[str, object] = {}
        self.layer_names: dict[int, list[str]] = defaultdict(list)
        self.other_names: list[str] = []
        for name in tensors:
            m = _LAYER_RE.match(name)
            if m:
                self.layer_names[int(m.group(1))].append(name)
            else:
                self.other_names.append(name)
        self.layer_names = dict(self.layer_names)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, source: str | os.PathLike, *,
             announce: Callable[[str], None] | None = None) -> "Checkpoint":
        """Open a local model folder, or ``hf:org/name`` from the Hugging Face Hub (downloaded into the HF
        cache after ``announce`` is told its total size and destination; default: a line on stderr).

        Only names and shapes are read here (the headers); the layout is checked for damaged, missing or
        mismatched shards. Model semantics (does this fit the architecture?) are ``reamkit.models``' job.
        """
        text = os.fspath(source)
        if isinstance(source, str) and text.startswith(HUB_PREFIX):
            path = _download(text[len(HUB_PREFIX):], announce or _to_stderr)
        else:
            path = Path(source)
            if not path.exists():
                hint = (f" (for the Hugging Face Hub repo write {HUB_PREFIX}{text})"
                        if _REPO_ID_RE.match(text) else "")
                raise CheckpointError(f"no such folder: {text}{hint}")
        if not path.is_dir():
            raise CheckpointError(f"{source} is not a model folder (expected a folder with config.json)")
        config = _read_config(path)
        tensors = _scan_weights(path)
        return cls(path, config, tensors)

    # ------------------------------------------------------------------ layout
    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def layer_infos(self, index: int) -> dict[str, TensorInfo]:
        """Header info of layer ``index``'s tensors, keyed relative to the layer."""
        prefix = layer_prefix(index)
        return {n[len(prefix):]: self.tensors[n] for n in self.layer_names.get(index, [])}

    @property
    def total_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def shards(self) -> list[str]:
        return sorted({t.shard for t in self.tensors.values()})

    def fingerprint(self) -> str:
        """A content hash of the config and of every byte of every shard (each shard's hash is cached by its
        identity on disk, so only new or changed shards are read)."""
        from concurrent.futures import ThreadPoolExecutor

        from ..identity import file_hash

        h = hashlib.sha256((self.path / CONFIG).read_bytes())
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:    # hashlib frees the GIL
            digests = pool.map(file_hash, [self.path / s for s in self.shards])
        for shard, digest in zip(self.shards, digests):
            h.update(shard.encode() + b"\0" + digest.encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ loading
    def load(self, names: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The named tensors (full names), each checked to hold only finite values as it is read, so a NaN
        or Inf in the weights stops every stage with the tensor's name instead of spreading silently."""
        out: dict[str, torch.Tensor] = {}
        for name in names:
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"tensor {name!r} is not in {self.path}")
            t = self._handle(info.shard).get_tensor(name)
            _check_finite(name, t, self.path / info.shard)
            out[name] = t
        return out

    def load_layer(self, index: int) -> dict[str, torch.Tensor]:
        """Decoder layer ``index``'s tensors, keyed relative to the layer (``mlp.gate.weight``)."""
        if index not in self.layer_names:
            raise CheckpointError(f"{self.path} has no tensors for decoder layer {index}")
        prefix = layer_prefix(index)
        return {k[len(prefix):]: v for k, v in self.load(self.layer_names[index]).items()}

    def load_group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, keyed relative to it (e.g. ``mtp.layers.0.``)."""
        names = [n for n in self.tensors if n.startswith(prefix)]
        if not names:
            raise CheckpointError(f"{self.path} has no tensors under {prefix!r}")
        return {k[len(prefix):]: v for k, v in self.load(names).items()}

    def load_other(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the decoder layers (embeddings, final norm, head, ``mtp.*``)."""
        return self.load(self.other_names)

    def check_finite(self) -> None:
        """Read every tensor once, one at a time, refusing the first that holds NaN or Inf (before work that
        would find it late, and for stages such as GGUF conversion whose reading happens outside reamkit). A
        shard found finite is remembered by its content hash and not read again."""
        from ..identity import file_hash, known, remember

        by_shard: dict[str, list[str]] = defaultdict(list)
        for name, info in self.tensors.items():
            by_shard[info.shard].append(name)
        for shard, names in by_shard.items():
            digest = file_hash(self.path / shard)
            if known(digest, "finite"):
                continue
            for name in names:
                self.load([name])
            remember(digest, "finite")

    def _handle(self, shard: str):
        h = self._handles.get(shard)
        if h is None:
            h = safe_open(str(self.path / shard), framework="pt")
            self._handles[shard] = h
        return h

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, model_type={self.model_type!r}, layers={self.num_layers})"


# ---------------------------------------------------------------------- helpers
def _read_config(path: Path) -> dict:
    p = path / CONFIG
    if not p.is_file():
        raise CheckpointError(f"{path} has no config.json, so it is not a Hugging Face model folder")
    try:
        config = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{p} has no model_type")
    return config


def _scan_weights(path: Path) -> dict[str, TensorInfo]:
    """Map every tensor to its shard, checking that the shards exist, are whole and match the index."""
    index_file = path / INDEX
    if index_file.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index_file} is not a valid safetensors index") from None
        shards = sorted(set(weight_map.values()))
    elif (path / SINGLE).is_file():
        weight_map, shards = {}, [SINGLE]
    else:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if found:
            raise CheckpointError(f"{path} has shards {found[:3]} but no {INDEX}")
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise CheckpointError(f"{path} holds pickle weights; only safetensors are supported",
                                  fix="re-save the model with save_pretrained(safe_serialization=True)")
        raise CheckpointError(f"{path} has no safetensors weights")

    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise CheckpointError(f"shard {missing[0]} listed in {INDEX} is missing from {path}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        entries, _ = read_header(path / shard)
        for name, e in entries.items():
            if weight_map and weight_map.get(name) != shard:
                if name in weight_map:
                    raise CheckpointError(f"{INDEX} puts {name!r} in {weight_map[name]} but it is in {shard}")
                continue  # stray tensor the index does not reference: transformers ignores it too
            tensors[name] = _info(name, shard, e)
    absent = [n for n in weight_map if n not in tensors]
    if absent:
        raise CheckpointError(f"{len(absent)} tensor(s) listed in {INDEX} are not in their shard, e.g. {absent[0]!r}")
    return tensors


def _info(name: str, shard: str, e: HeaderEntry) -> TensorInfo:
    return TensorInfo(name=name, shard=shard, dtype=e.dtype, shape=e.shape, nbytes=e.nbytes)


def _check_finite(name: str, t: torch.Tensor, where: Path) -> None:
    """One pass, no temporaries: NaN propagates into min and max, +-Inf becomes one of them (about 2 GB/s per
    core, against about 0.15 GB/s for ``isfinite().all()``)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    if t.element_size() == 1:           # FP8 checkpoints: CPU kernels need a wider type (exact)
        t = t.to(torch.bfloat16)
    lo, hi = torch.aminmax(t)
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"tensor {name!r} in {where} holds {bad} NaN/Inf value(s) of {t.numel()}",
                                  fix="the checkpoint is damaged or diverged; re-download or re-create it")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _download(repo_id: str, announce: Callable[[str], None]) -> Path:
    """Fetch a Hub repo's config, tokenizer and safetensors into the HF cache, saying first how much and where."""
    from huggingface_hub import snapshot_download

    if not _REPO_ID_RE.match(repo_id):
        raise CheckpointError(f"{HUB_PREFIX}{repo_id} is not a Hugging Face Hub repo id (expected {HUB_PREFIX}org/name)")
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]
    try:
        plan = snapshot_download(repo_id=repo_id, allow_patterns=patterns, dry_run=True)
        total = sum(f.file_size or 0 for f in plan if f.will_download)
        n_new = sum(1 for f in plan if f.will_download)
        dest = Path(plan[0].local_path[: -len(plan[0].filename)]) if plan else None
        if n_new:
            announce(f"downloading {repo_id}: {_human(total)} in {n_new} file(s) into {dest}")
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: all one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"fetching {repo_id} from the Hugging Face Hub failed: {first}",
                              fix="check the repo id and network, or pass a local model folder") from None


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
