"""Calibration sets: a mixture spec resolved to sources, tokenised with the model's tokenizer, packed.

A spec is ``name=weight,name=weight`` (weights are normalised), e.g. ``code=0.7,math=0.3``
(:data:`reamkit.defaults.CALIB_MIX`, as used for Qwen3-Coder-Next-REAM). A name is one of:

* a built-in offline corpus, ``code`` (Python source) or ``math`` (worked solutions); only their calibration
  part is used -- evaluation reads the disjoint held-out part;
* a local path: a text file (one document), a folder (every text file under it, one document each), a
  ``.jsonl`` file (one document per line, from the first of the fields ``text``, ``content``, ``solution``),
  or a ``.parquet`` file (same fields; needs pyarrow);
* a Hugging Face dataset, by a known alias (``the-stack-smol``, ``numinamath``, ``c4``) or ``hf:owner/name``,
  read with the ``datasets`` library when the Hub is reachable.

Documents of each source are shuffled with the seed, tokenised (no special tokens), joined with the EOS token
and cut into rows of exactly ``seq_len`` tokens (packing: no padding). Each source contributes
``round(samples * weight)`` rows. The result is cached by everything that decides it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..defaults import CALIB_MIX
from ..errors import ReamkitError
from ..identity import file_hash
from . import corpus

TEXT_FIELDS = ("text", "content", "solution")
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts", ".go", ".rs",
                 ".java", ".kt", ".swift", ".rb", ".php", ".sh", ".sql", ".tex", ".json", ".toml", ".yaml", ".yml"}
HF_ALIASES = {   # the REAM defaults: (dataset, config, split, text field)
    "the-stack-smol": ("bigcode/the-stack-smol", None, "train", "content"),
    "numinamath": ("AI-MO/NuminaMath-1.5", None, "train", "solution"),
    "c4": ("allenai/c4", "en", "validation", "text"),
}
BUILTIN = ("code", "math")


@dataclass(frozen=True)
class Source:
    name: str
    weight: float


def parse_mix(spec: str) -> list[Source]:
    """``code=0.7,math=0.3`` -> sources with weights summing to 1. A bare name gets weight 1."""
    out: list[Source] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, w = part.partition("=")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise ReamkitError(f"calibration mix {spec!r}: weight {w!r} of {name!r} is not a number") from None
        if weight <= 0:
            raise ReamkitError(f"calibration mix {spec!r}: weight of {name!r} must be positive")
        out.append(Source(name.strip(), weight))
    if not out:
        raise ReamkitError(f"empty calibration mix; give e.g. {CALIB_MIX}")
    total = sum(s.weight for s in out)
    return [Source(s.name, s.weight / total) for s in out]


def check_source(name: str) -> None:
    """Fail early (before any model work) on a source that cannot be read."""
    if name in BUILTIN:
        return
    if os.path.exists(name):
        if Path(name).suffix == ".parquet":
            _require("pyarrow", f"reading {name}")
        return
    if name in HF_ALIASES or name.startswith("hf:"):
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise ReamkitError(f"calibration dataset {name} needs the Hugging Face Hub, but offline mode is set "
                               f"(HF_HUB_OFFLINE); use the built-in code/math corpora or a local file")
        if not _hub_reachable():
            raise ReamkitError(f"calibration dataset {name} needs the Hugging Face Hub, which is not reachable; "
                               f"use the built-in code/math corpora or a local file")
        _require("datasets", f"the Hugging Face dataset {name}")
        return
    raise ReamkitError(f"calibration source {name!r} is not a built-in corpus ({', '.join(BUILTIN)}), an existing "
                       f"path, or a known dataset ({', '.join(HF_ALIASES)}, or hf:owner/name)")


def _require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ReamkitError(f"{what} needs the {module} package", fix=f"pip install {module}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------- documents
def documents(name: str, seed: int) -> Iterator[str]:
    """The documents of a source, in a seeded order (built-ins: the calibration part only)."""
    if name == "code":
        docs = corpus.calibration_part(corpus.code_documents())
    elif name == "math":
        docs = corpus.calibration_part(corpus.math_documents(20_000, seed=0))
    elif os.path.exists(name):
        docs = list(_local_documents(Path(name)))
    else:
        yield from _hub_documents(name, seed)
        return
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    for i in order:
        yield docs[i]


def _local_documents(path: Path) -> Iterator[str]:
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | {".jsonl"}:
                yield from _local_documents(p)
        return
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                text = _field(json.loads(line), f"{path}:{n}")
                if text:
                    yield text
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        col = next((f for f in TEXT_FIELDS if f in table.column_names), None)
        if col is None:
            raise ReamkitError(f"{path} has none of the columns {', '.join(TEXT_FIELDS)}")
        yield from (t for t in table.column(col).to_pylist() if t)
    else:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ReamkitError(f"{path} is not UTF-8 text") from None


def _field(record: dict, where: str) -> str:
    for f in TEXT_FIELDS:
        if isinstance(record, dict) and isinstance(record.get(f), str):
            return record[f]
    raise ReamkitError(f"{where}: no text field ({', '.join(TEXT_FIELDS)})")


def _hub_documents(name: str, seed: int) -> Iterator[str]:  # pragma: no cover - needs the network
    import datasets

    repo, cfg, split, fld = HF_ALIASES.get(name) or (name[3:], None, "train", None)
    ds = datasets.load_dataset(repo, cfg, split=split, streaming=True).shuffle(seed=seed, buffer_size=10_000)
    for rec in ds:
        text = rec.get(fld) if fld else _field(rec, name)
        if text:
            yield text


# ---------------------------------------------------------------------- packing
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def check_tokenizer(model_dir: Path) -> None:
    """Refuse, before any work, a model folder without its tokenizer (calibration and GGUF both need it)."""
    if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        raise ReamkitError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})",
                           fix="copy the tokenizer files of the original model into the folder")


def build_calibration(tokenizer_dir: Path, spec: str = CALIB_MIX, *, samples: int, seq_len: int, seed: int = 0,
                      cache_dir: Path | None = None) -> torch.Tensor:
    """Token ids [samples, seq_len] (int64) for the mixture, from the model's own tokenizer; cached."""
    from transformers import AutoTokenizer

    if samples < 1 or seq_len < 2:
        raise ReamkitError(f"calibration needs at least 1 sample of at least 2 tokens (got {samples} x {seq_len})")
    sources = parse_mix(spec)
    for s in sources:
        check_source(s.name)
    tok_file = Path(tokenizer_dir) / "tokenizer.json"
    key_blob = json.dumps({"spec": [(s.name, s.weight) for s in sources], "samples": samples, "seq_len": seq_len,
                           "seed": seed, "corpus": corpus.VERSION,
                           "tokenizer": file_hash(tok_file) if tok_file.is_file()
                           else str(tokenizer_dir)}, sort_keys=True)
    key = hashlib.sha256(key_blob.encode()).hexdigest()[:16]
    cache = (cache_dir or _cache_dir()) / f"calib-{key}.pt"
    if cache.is_file():
        return torch.load(cache)
    check_tokenizer(Path(tokenizer_dir))
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as e:
        raise ReamkitError(f"cannot load the tokenizer of {tokenizer_dir}: {' '.join(str(e).split())[:200]}") from None
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    counts = _row_counts(sources, samples)
    rows: list[torch.Tensor] = []
    for s, n in zip(sources, counts):
        rows.extend(_pack(tok, s.name, n, seq_len, seed, eos))
    ids = torch.stack(rows)
    from ..fsutil import atomic_file

    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(cache) as tmp:
        torch.save(ids, tmp)
    return ids


def _row_counts(sources: list[Source], samples: int) -> list[int]:
    counts = [int(round(samples * s.weight)) for s in sources]
    counts[-1] = samples - sum(counts[:-1])
    if any(c < 1 for c in counts):
        raise ReamkitError(f"{samples} calibration samples are too few for the mix "
                           f"{', '.join(f'{s.name}={s.weight:.2f}' for s in sources)}; every source needs a row")
    return counts


def _pack(tok, name: str, n_rows: int, seq_len: int, seed: int, eos: int) -> list[torch.Tensor]:
    buf: list[int] = []
    need = n_rows * seq_len
    for doc in documents(name, seed):
        buf.extend(tok(doc, add_special_tokens=False)["input_ids"])
        buf.append(eos)
        if len(buf) >= need:
            break
    if len(buf) < need:
        raise ReamkitError(f"calibration source {name!r} has only {len(buf):,} tokens; {n_rows} rows of {seq_len} "
                           f"need {need:,} (lower --samples or --seq-len, or add data)")
    t = torch.tensor(buf[:need], dtype=torch.int64)
    return list(t.view(n_rows, seq_len))


def _cache_dir() -> Path:
    from ..cache import cache_root

    return cache_root() / "calibration"
