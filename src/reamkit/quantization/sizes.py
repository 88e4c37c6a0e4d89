"""``reamkit sizes``: each variant's file size predicted from the config alone (or from a GGUF's header).

A GGUF is a header (key/values, then one info record per tensor) padded to 32 bytes, followed by every
tensor's data, each padded to 32 bytes. The data part is exact: :func:`rules.choose_types` emulates the
quantizer's per-tensor choice and each type's block geometry gives the bytes. The header is exact when a
reference GGUF is given; from a config it is estimated (tokenizer arrays from ``tokenizer.json`` when it sits
next to the config, else from the vocabulary size), which matters only for tiny models.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..defaults import KEEP_TYPE, LADDER_KIND
from ..errors import ReamkitError
from .inventory import Inventory, inventory_from_config, inventory_from_gguf
from .ladders import LADDERS, ladder_overrides, parse_types
from .rules import choose_types, file_bpw, tensor_bytes

ALIGN = 32
_OTHER_KV_BYTES = 2048           # general.* and <arch>.* hyperparameters (about 40 short keys)
_QUANT_KV_BYTES = 2 * 40 + 8     # general.file_type / quantization_version (already in a reference GGUF)


@dataclass(frozen=True)
class SizeRow:
    type: str                    # file type, with "-moe" for the MoE-aware ladder
    size_bytes: int
    size_gb: float               # 10^9 bytes
    size_gib: float
    bpw: float


def pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def data_bytes(inv: Inventory, types: dict[str, str]) -> int:
    return sum(pad(tensor_bytes(types[t.name], t.shape)) for t in inv.tensors)


def predict(inv: Inventory, header_bytes: int, file_types: list[str], *, ladder: str, has_imatrix: bool,
            keep_type: str) -> list[SizeRow]:
    rows = []
    for ft in file_types:
        overrides = ladder_overrides(ladder, ft, keep_type, tensors=inv.tensors, facts=inv.facts, arch=inv.arch,
                                     has_imatrix=has_imatrix)
        types = choose_types(inv.tensors, ft, inv.facts, overrides=overrides, has_imatrix=has_imatrix)
        size = pad(header_bytes) + data_bytes(inv, types)
        rows.append(SizeRow(type=ft + LADDERS[ladder], size_bytes=size, size_gb=size / 1e9, size_gib=size / 2**30,
                            bpw=file_bpw(size, inv.n_elements)))
    return rows


def predict_sizes(model: str | Path, *, types: list[str] | None = None, experts: int | None = None,
                  ladder: str = LADDER_KIND, has_imatrix: bool = False, keep_type: str = KEEP_TYPE) -> list[SizeRow]:
    """Sizes of each variant of ``model`` (a model folder, its ``config.json``, or a GGUF)."""
    file_types = parse_types(types)
    if ladder not in LADDERS:
        raise ReamkitError(f"unknown ladder {ladder!r}; choose one of: {', '.join(LADDERS)}")
    path = Path(model)
    if path.suffix == ".gguf":
        if experts is not None:
            raise ReamkitError("--experts applies to a config, not to a GGUF (whose expert count is fixed)")
        inv = inventory_from_gguf(path)
        header = inv.header_bytes + _QUANT_KV_BYTES
    else:
        cfg_path = path / "config.json" if path.is_dir() else path
        if not cfg_path.is_file():
            raise ReamkitError(f"no config.json at {path}", fix="pass a model folder, its config.json or a GGUF")
        try:
            config = json.loads(cfg_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ReamkitError(f"{cfg_path} is not valid JSON: {e}") from None
        inv = inventory_from_config(config, experts=experts, ref_type=_reference_type(config))
        header = estimate_header_bytes(inv, int(config["vocab_size"]), cfg_path.parent)
    return predict(inv, header, file_types, ladder=ladder, has_imatrix=has_imatrix, keep_type=keep_type)


def _reference_type(config: dict) -> str:
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    return "BF16" if "bfloat16" in dtype else "F16"


def estimate_header_bytes(inv: Inventory, vocab_size: int, model_dir: Path) -> int:
    """The GGUF header: fixed part, tensor infos (exact), tokenizer arrays and the other key/values."""
    infos = sum(8 + len(t.name) + 4 + 8 * len(t.shape) + 4 + 8 for t in inv.tensors)
    return 24 + infos + tokenizer_kv_bytes(vocab_size, model_dir) + _OTHER_KV_BYTES + _QUANT_KV_BYTES


def tokenizer_kv_bytes(vocab_size: int, model_dir: Path) -> int:
    """Bytes of the tokenizer key/values: token strings, token types, merges and the chat template.

    Read from ``tokenizer.json`` / ``chat_template.jinja`` when present; otherwise typical BPE figures
    (7-byte tokens, 12-byte merges, one merge per token).
    """
    arrays = 3 * (8 + 24 + 4 + 4 + 8)      # key + type + element type + count, per array
    tok_file = model_dir / "tokenizer.json"
    try:
        tok = json.loads(tok_file.read_text()) if tok_file.is_file() else None
    except (ValueError, UnicodeDecodeError):
        tok = None
    model = (tok or {}).get("model") or {}
    if isinstance(model.get("vocab"), dict) and isinstance(model.get("merges"), list):
        pieces = {i: p for p, i in model["vocab"].items()}
        pieces.update({a["id"]: a["content"] for a in tok.get("added_tokens", [])})
        tokens = sum(8 + len(pieces.get(i, f"[PAD{i}]").encode()) for i in range(vocab_size))
        merges = sum(8 + len((" ".join(m) if isinstance(m, list) else m).encode()) for m in model["merges"])
    else:
        tokens, merges = vocab_size * (8 + 7), vocab_size * (8 + 12)
    template = 0
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        f = model_dir / name
        if f.is_file():
            text = f.read_text(errors="replace")
            template = len(text.encode()) if name.endswith(".jinja") else len(
                str(json.loads(text).get("chat_template") or "").encode())
            if template:
                break
    return arrays + tokens + 4 * vocab_size + merges + (40 + template if template else 0)


def rows_as_dicts(rows: list[SizeRow]) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if k != "size_bytes"} for r in rows]


def sizes_table(rows: list[SizeRow]):
    from rich.table import Table

    table = Table("type", "GB", "GiB", "bpw")
    for r in rows:
        table.add_row(r.type, _num(r.size_gb), _num(r.size_gib), f"{r.bpw:.2f}")
    return table


def _num(x: float) -> str:
    return f"{x:.2f}" if x >= 1 else f"{x:.4f}"
