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

import collections
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ..children import die_with_parent
from ..defaults import FALLBACK_PRE, GGUF_DTYPE
from ..errors import MachineError, ReamkitError, ToolchainError
from ..fsutil import atomic_file, check_free_space, check_writable
from ..identity import file_hash
from ..manifest import Manifest, existing_output_is_current, manifest_path_for, stage_key, write_manifest
from ..models import open_model
from ..toolchain import find_toolchain, last_error_line

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
        env = {**os.environ, "REAMKIT_LLAMA_CPP_SRC": str(tc.src_dir), "REAMKIT_FALLBACK_PRE": fallback_pre,
               "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        env.pop("NO_LOCAL_GGUF", None)
        tail = _run_streaming(cmd, env, on_line)
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


def _run_streaming(cmd: list[str], env: dict, on_line: Callable[[str], None] | None) -> str | None:
    """Run the converter, forwarding its log lines; None on success, else its most telling error line."""
    tail: collections.deque[str] = collections.deque(maxlen=400)
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, preexec_fn=die_with_parent) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                tail.append(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            rc = proc.wait()
        except BaseException:        # Ctrl-C, SIGTERM: the converter stops now, not when it is done
            proc.kill()
            raise
    return None if rc == 0 else last_error_line("".join(tail))


def _check_gguf(path: Path) -> int:
    """Open the result with gguf-py; a converter that 'succeeded' with a broken file is an error."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
        raise ToolchainError(f"the converter wrote an unreadable GGUF: {e}") from None
    if not reader.tensors:
        raise ToolchainError("the converter wrote a GGUF without tensors")
    return len(reader.tensors)
