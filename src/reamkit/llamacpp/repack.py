"""Weight repacking ("extra buffer types"): whether it works here, and turning it off where it does not.

llama.cpp repacks quantized weights into CPU-specific layouts at load time. On CPUs that advertise AMX under a
hypervisor that does not enable it, those kernels die with SIGILL on every quantized GGUF (F16/F32 load fine).
Repacking changes speed, never results, so reamkit probes once per llama.cpp build and CPU whether it works and
turns it off everywhere it runs llama.cpp on a model when it does not: tools through :mod:`.tools`, the Python
bindings through :func:`load_llama`.

The probe needs no model of reamkit's: it writes a tiny mixture-of-experts model (rows 256 wide, like the demo
model's) with gguf-py, quantizes it to Q4_0 and evaluates it with repacking on, in a child process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..cache import cache_root
from ..errors import ToolchainError
from ..fsutil import write_json
from .process import run
from .toolchain import Toolchain, find_toolchain

log = logging.getLogger(__name__)

REPACK_OVERRIDE = "REAMKIT_REPACK"          # "0"/"1" skips the probe and forces the setting
MODEL_TOOLS = ("llama-imatrix", "llama-perplexity", "llama-bench", "llama-server")   # tools that load a model
@dataclass(frozen=True)
class RepackDecision:
    on: bool
    reason: str          # "works on this CPU", "faults on this CPU (SIGILL)", "forced by REAMKIT_REPACK=0", ...


def cpu_fingerprint() -> str:
    """The CPU as llama.cpp sees it: model name and feature flags (so a cache shared between machines is safe)."""
    text = ""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
        block = info.split("\n\n")[0]
        text = "\n".join(ln for ln in block.splitlines() if ln.split(":")[0].strip() in ("model name", "flags"))
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{platform.processor()}|{text}".encode()).hexdigest()[:12]


def repack_probe_file(commit: str) -> Path:
    return cache_root() / "probes" / f"repack-{commit}-{cpu_fingerprint()}.json"


def write_probe_model(path: Path, *, hidden: int = 256, experts: int = 4, vocab: int = 320) -> Path:
    """A tiny F16 llama-architecture GGUF with a mixture-of-experts layer (random weights, a byte vocabulary):
    enough for llama.cpp to load, repack and evaluate both its dense and its expert matrix products."""
    import numpy as np
    from gguf import GGUFWriter

    rng = np.random.default_rng(0)
    heads, kv_heads, head_dim = 4, 2, hidden // 4

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float16)

    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += [f"t{i}" for i in range(vocab - len(tokens))]
    writer = GGUFWriter(str(path), "llama")
    for key, value in {"context_length": 128, "embedding_length": hidden, "block_count": 1,
                       "feed_forward_length": hidden, "attention.head_count": heads,
                       "attention.head_count_kv": kv_heads, "rope.dimension_count": head_dim,
                       "expert_count": experts, "expert_used_count": 2}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3, *[6] * 256, *[1] * (vocab - 259)])     # unknown, control, byte, normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    ones = np.ones(hidden, dtype=np.float32)
    for name, array in {"token_embd.weight": w(vocab, hidden), "output_norm.weight": ones,
                        "output.weight": w(vocab, hidden), "blk.0.attn_norm.weight": ones,
                        "blk.0.attn_q.weight": w(heads * head_dim, hidden),
                        "blk.0.attn_k.weight": w(kv_heads * head_dim, hidden),
                        "blk.0.attn_v.weight": w(kv_heads * head_dim, hidden),
                        "blk.0.attn_output.weight": w(hidden, heads * head_dim), "blk.0.ffn_norm.weight": ones,
                        "blk.0.ffn_gate_inp.weight": w(experts, hidden).astype(np.float32),
                        "blk.0.ffn_gate_exps.weight": w(experts, hidden, hidden),
                        "blk.0.ffn_up_exps.weight": w(experts, hidden, hidden),
                        "blk.0.ffn_down_exps.weight": w(experts, hidden, hidden)}.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def probe_repack(tc: Toolchain, work: Path) -> RepackDecision:
    """Quantize the probe model to Q4_0 and evaluate it with repacking on, in a child process."""
    f16 = write_probe_model(work / "probe.F16.gguf")
    q4 = work / "probe.Q4_0.gguf"
    run([tc.tool("llama-quantize"), f16, q4, "Q4_0"], name="llama-quantize", timeout=600)
    done = run([sys.executable, "-m", __name__, q4], name="the weight-repacking probe", timeout=600,
               separate_stdout=True, grace=False, check=False)
    if done.returncode == 0 and "repack-probe-ok" in done.stdout:
        return RepackDecision(True, "works on this CPU")
    if done.returncode < 0:
        try:
            sig = signal.Signals(-done.returncode).name
        except ValueError:
            sig = f"signal {-done.returncode}"
        return RepackDecision(False, f"faults on this CPU, {sig}")
    raise ToolchainError(f"the weight-repacking probe failed (exit {done.returncode}): {done.last_error}")


@lru_cache(maxsize=1)
def repack_decision() -> RepackDecision:
    """Whether llama.cpp's weight repacking works here; probed once per llama.cpp build and CPU, then cached."""
    forced = os.environ.get(REPACK_OVERRIDE, "").strip()
    if forced in ("0", "1"):
        return RepackDecision(forced == "1", f"forced by {REPACK_OVERRIDE}={forced}")
    tc = find_toolchain()
    cached = repack_probe_file(tc.commit)
    try:
        data = json.loads(cached.read_text())
        return RepackDecision(bool(data["on"]), str(data["reason"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log.info("checking once whether llama.cpp's weight repacking works on this CPU")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".repack-probe-") as work:
        try:
            decision = probe_repack(tc, Path(work))
        except ToolchainError as e:   # undecided: stay safe, probe again next time
            return RepackDecision(False, f"the probe did not finish: {str(e)[:200]}")
    write_json(cached, {"on": decision.on, "reason": decision.reason, "llama_cpp_commit": tc.commit,
                        "cpu": cpu_fingerprint()})
    return decision


def repack_env(tool: str | None = None) -> dict[str, str]:
    """Environment for a llama.cpp tool (llama-server, -perplexity, -imatrix) that turns repacking off if needed."""
    if tool is not None and tool not in MODEL_TOOLS:
        return {}
    return {} if repack_decision().on else {"LLAMA_ARG_REPACK": "0"}


def repack_args(tool: str, args: list | tuple = ()) -> list[str]:
    """llama-bench has no environment switch: ``--repack 0`` unless the caller chose already."""
    if tool != "llama-bench" or any(str(a) in ("--repack", "-nr", "--no-repack") for a in args):
        return []
    return [] if repack_decision().on else ["--repack", "0"]


def load_llama(path: str | Path, **kwargs):
    """``llama_cpp.Llama(model_path=path, **kwargs)`` with repacking off where it faults on this CPU."""
    from llama_cpp import Llama

    kwargs.setdefault("verbose", False)
    if repack_decision().on:
        return Llama(model_path=str(path), **kwargs)
    with _repacking(False):
        return Llama(model_path=str(path), **kwargs)


@contextmanager
def _repacking(on: bool):
    """The bindings' model parameters with repacking (``use_extra_bufts``) set to ``on`` (they offer no switch)."""
    import llama_cpp.llama_cpp as capi

    with _LOAD_LOCK:
        original = capi.llama_model_default_params

        def params():
            p = original()
            p.use_extra_bufts = on
            return p

        capi.llama_model_default_params = params
        try:
            yield
        finally:
            capi.llama_model_default_params = original


_LOAD_LOCK = threading.Lock()


if __name__ == "__main__":     # the probe's child: evaluate the quantized probe model with repacking on
    from llama_cpp import Llama

    with _repacking(True):
        llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
    llm.eval(list(range(3, 35)))
    print("repack-probe-ok")
