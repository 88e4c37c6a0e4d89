"""``reamkit convert``: a Hugging Face checkpoint to one GGUF file, via the pinned llama.cpp converter.

Before converting, every tensor is read once and checked to be finite (a NaN would otherwise convert
silently into a GGUF that produces garbage). Workarounds applied automatically:

1. the family's adapter adds the flags its checkpoints need (``--no-mtp`` for a ``qwen3_next`` checkpoint
   without ``mtp.*`` tensors, which the converter otherwise asserts on; with MTP tensors present they are
   converted too), or refuses a layout the converter cannot read;
2. an unknown tokenizer hash falls back to a configured pre-tokenizer (``qwen2``) instead of failing;
3. ``sentencepiece`` is a reamkit dependency, which the converter needs for Llama-family vocabularies.

The GGUF is written to a temporary file and renamed into place with a manifest beside it, so an interrupted
conversion leaves nothing behind and a repeated one is skipped.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from ..defaults import FALLBACK_PRE, GGUF_DTYPE
from ..errors import MachineError, ReamkitError, ToolchainError
from ..fsutil import atomic_file, check_free_space, check_writable
from ..identity import file_hash
from ..llamacpp import process
from ..llamacpp.gguf_file import open_gguf
from ..llamacpp.toolchain import find_toolchain
from ..manifest import Manifest, existing_output_is_current, manifest_path_for, stage_key, write_manifest
from ..models import open_model

GGUF_DTYPES = ("f32", "f16", "bf16")
_ENTRY = Path(__file__).with_name("converter_entry.py")


def convert_to_gguf(model: str | Path, out: Path, *, dtype: str = GGUF_DTYPE, fallback_pre: str = FALLBACK_PRE,
                    on_line: Callable[[str], None] | None = None) -> tuple[Path, bool]:
    """Convert ``model`` (folder, or ``hf:org/name``) to ``out``. Returns ``(out, converted)``;
    ``converted`` is False when ``out`` already held this very conversion."""
    if dtype not in GGUF_DTYPES:
        raise ReamkitError(f"unsupported GGUF dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    out = Path(out)
    opened = open_model(model)
    ckpt = opened.checkpoint
    tc = find_toolchain()
    extra = opened.adapter.gguf_converter_args(ckpt)
    inputs = {"model_fingerprint": ckpt.fingerprint()}
    params = {"dtype": dtype, "llama_cpp_commit": tc.commit, "converter_args": extra, "fallback_pre": fallback_pre}
    key = stage_key("convert", inputs, params)
    if existing_output_is_current(out, key, "GGUF", folder=False):
        return out, False

    check_writable(out.parent)
    check_free_space(out.parent, _predicted_bytes(ckpt, dtype), f"the {dtype} GGUF")
    ckpt.check_finite()
    with atomic_file(out) as tmp:
        cmd = [sys.executable, str(_ENTRY), str(ckpt.path), "--outtype", dtype, "--outfile", str(tmp), *extra]
        env = {"REAMKIT_LLAMA_CPP_SRC": str(tc.src_dir), "REAMKIT_FALLBACK_PRE": fallback_pre,
               "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        done = process.run(cmd, name="convert_hf_to_gguf.py", env=env, unset=("NO_LOCAL_GGUF",), on_line=on_line,
                           grace=False, check=False)
        tail = None if done.returncode == 0 else done.last_error
        if tail is not None and shutil.disk_usage(out.parent).free < (64 << 20):
            raise MachineError(f"no space left on the device holding {out} (the converter stopped: {tail[:120]})",
                               fix="free some space and convert again")
        if tail is not None:
            raise ToolchainError(f"convert_hf_to_gguf.py failed on {ckpt.path}: {tail}")
        n_tensors = _check_gguf(tmp)
        write_manifest(manifest_path_for(out, folder=False), Manifest.new(
            "convert", inputs=inputs, params=params, info={"model": str(ckpt.path)},
            outputs={"file": out.name, "bytes": tmp.stat().st_size, "sha256": file_hash(tmp),
                     "tensors": n_tensors}))
    return out, True


def _predicted_bytes(ckpt, dtype: str) -> int:
    """The GGUF's size, near enough to check free space: every weight at the chosen width (norms stay f32)."""
    width = 4 if dtype == "f32" else 2
    return sum(math.prod(t.shape) for t in ckpt.tensors.values()) * width


def _check_gguf(path: Path) -> int:
    """Open the result; a converter that 'succeeded' with a broken file is an error."""
    try:
        reader = open_gguf(path)
    except ReamkitError as e:
        raise ToolchainError(f"the converter wrote an unreadable GGUF: {e.problem}") from None
    if not reader.tensors:
        raise ToolchainError("the converter wrote a GGUF without tensors")
    return len(reader.tensors)
