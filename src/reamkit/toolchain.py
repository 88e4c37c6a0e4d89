"""The one pinned llama.cpp: locate its tools and converter, report versions, run tools with clean errors.

``scripts/bootstrap.sh`` builds the pinned llama-cpp-python sdist (its sha256 checked first) once into a cache
outside the repo, as one wheel carrying the Python bindings and the tools, and keeps the same source's
``convert_hf_to_gguf.py`` + ``conversion/`` + ``gguf-py/`` next to it. Converter, quantizer, imatrix,
perplexity, bench and server therefore all come from one llama.cpp commit, which the tools themselves report.

Every version comes from ``constraints.txt`` (:func:`pins`); nothing here repeats one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from .errors import ToolchainError

log = logging.getLogger(__name__)

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-server")
FIX = "run scripts/bootstrap.sh"
SRC_POINTER = "reamkit-llama-cpp-src"   # file in the venv naming the converter source folder
SDIST_SHA_FILE = "sdist.sha256"         # written by the bootstrap next to the converter: sha256 of what it built
CONSTRAINTS = "constraints.txt"
_PIN_RE = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)")
_EXTRA_PIN_RE = re.compile(r"^#\s*pin:\s*(\S+)\s+(\S+)")


@dataclass(frozen=True)
class Pins:
    """What ``constraints.txt`` pins: exact package versions, and the llama.cpp source they build."""

    packages: dict[str, str] = field(default_factory=dict)     # normalised name -> exact version
    extra: dict[str, str] = field(default_factory=dict)        # "# pin: key value" lines

    def version(self, dist: str) -> str:
        return self.packages[_norm(dist)]

    @property
    def llama_cpp_python(self) -> str:
        return self.version("llama-cpp-python")

    @property
    def llama_cpp_commit(self) -> str:
        return self.extra["llama.cpp-commit"]

    @property
    def sdist_sha256(self) -> str:
        return self.extra["llama-cpp-python-sdist-sha256"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints_file() -> Path:
    """``constraints.txt`` of this checkout, or the copy a non-editable install puts under ``share/reamkit``."""
    for candidate in (Path(__file__).resolve().parents[2] / CONSTRAINTS,
                      Path(sys.prefix) / "share" / "reamkit" / CONSTRAINTS):
        if candidate.is_file():
            return candidate
    raise ToolchainError("constraints.txt (reamkit's version pins) was not found", fix="reinstall reamkit: " + FIX)


@lru_cache(maxsize=1)
def pins() -> Pins:
    out = Pins()
    for line in constraints_file().read_text().splitlines():
        line = line.strip()
        if m := _PIN_RE.match(line):
            out.packages[_norm(m.group(1))] = m.group(2)
        elif m := _EXTRA_PIN_RE.match(line):
            out.extra[m.group(1)] = m.group(2)
    return out


@dataclass(frozen=True)
class Toolchain:
    bin_dir: Path
    src_dir: Path
    commit: str

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ToolchainError(f"llama.cpp tool {name} not found in {self.bin_dir}", fix=FIX)
        return path

    @property
    def converter(self) -> Path:
        return self.src_dir / "convert_hf_to_gguf.py"

    def run(self, name: str, args: list[str], *, timeout: float | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a tool; a non-zero exit raises ToolchainError quoting the tool's last error line."""
        from .linger import linger_env

        cmd = [str(self.tool(name)), *map(str, args), *repack_args(name, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **repack_env(name), **linger_env(), **(env or {})})
        if proc.returncode != 0:
            raise ToolchainError(f"{name} failed (exit {proc.returncode}): {last_error_line(proc.stderr or proc.stdout)}")
        return proc


def last_error_line(text: str) -> str:
    """The most informative line of a tool's output: the last one mentioning an error, else the last."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"error|failed|exception|not found|invalid", ln, re.I):
            return ln
    return lines[-1] if lines else "no output"


def bin_dir() -> Path:
    try:
        import llama_cpp
    except ImportError:
        raise ToolchainError("llama-cpp-python is not installed", fix=FIX) from None
    except OSError as e:  # shared library problem
        raise ToolchainError(f"llama-cpp-python cannot load its libraries: {e}", fix=FIX) from None
    return Path(llama_cpp.__file__).resolve().parent.parent / "bin"


def src_dir() -> Path:
    env = os.environ.get("REAMKIT_LLAMA_CPP_SRC")
    if env:
        path = Path(env)
    else:
        pointer = Path(sys.prefix) / SRC_POINTER
        if not pointer.is_file():
            raise ToolchainError("the llama.cpp converter source is not set up", fix=FIX)
        path = Path(pointer.read_text().strip())
    if not (path / "convert_hf_to_gguf.py").is_file() or not (path / "gguf-py").is_dir():
        raise ToolchainError(f"llama.cpp converter not found in {path}", fix=FIX)
    return path


@lru_cache(maxsize=1)
def find_toolchain() -> Toolchain:
    """The pinned toolchain, or a one-line ToolchainError saying how to get it.

    The commit is the one the built tools report of themselves, and must be the pinned one."""
    p = pins()
    version = installed_version("llama_cpp_python")
    if version is None:
        raise ToolchainError("llama.cpp (llama-cpp-python with its tools) is not installed", fix=FIX)
    if version != p.llama_cpp_python:
        raise ToolchainError(f"llama-cpp-python {version} is installed, reamkit pins {p.llama_cpp_python}", fix=FIX)
    src = src_dir()
    tc = Toolchain(bin_dir=bin_dir(), src_dir=src, commit="")
    for name in TOOLS:
        tc.tool(name)
    commit = tool_build(tc)
    if not (commit.startswith(p.llama_cpp_commit) or p.llama_cpp_commit.startswith(commit)):
        raise ToolchainError(f"the llama.cpp tools were built from commit {commit}, reamkit pins "
                             f"{p.llama_cpp_commit}", fix=FIX)
    return Toolchain(bin_dir=tc.bin_dir, src_dir=src, commit=commit)


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def tool_build(tc: Toolchain) -> str:
    """The commit the binaries report of their own build (``version: 0.5.0-dev (build 0, commit 0c1e57098)``)."""
    proc = subprocess.run([str(tc.tool("llama-server")), "--version"], capture_output=True, text=True, timeout=60)
    text = (proc.stdout + proc.stderr)
    m = re.search(r"commit ([0-9a-f]{7,40})", text)
    if proc.returncode != 0 or not m:
        raise ToolchainError(f"llama-server --version does not report its commit: {last_error_line(text)}", fix=FIX)
    return m.group(1)


def built_sdist_sha256(tc: Toolchain) -> str | None:
    """sha256 of the llama-cpp-python sdist this toolchain was built from, as the bootstrap recorded it."""
    f = tc.src_dir.parent / SDIST_SHA_FILE
    return f.read_text().split()[0] if f.is_file() else None


# --- Weight repacking ("extra buffer types") -------------------------------------------------------------------
# llama.cpp repacks quantized weights into CPU-specific layouts at load time. On CPUs that advertise AMX under a
# hypervisor that does not enable it, those kernels die with SIGILL on every quantized GGUF (F16/F32 load fine).
# Repacking changes speed, never results, so reamkit probes once per llama.cpp build and CPU whether it works and
# turns it off everywhere it runs llama.cpp on a model when it does not.

REPACK_OVERRIDE = "REAMKIT_REPACK"          # "0"/"1" skips the probe and forces the setting
MODEL_TOOLS = ("llama-imatrix", "llama-perplexity", "llama-bench", "llama-server")   # tools that load a model
_PROBE_SCRIPT = r"""
import sys
import llama_cpp.llama_cpp as capi
from llama_cpp import Llama
original = capi.llama_model_default_params
def params():
    p = original()
    p.use_extra_bufts = True
    return p
capi.llama_model_default_params = params
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
llm.eval(llm.tokenize(b"def add(a, b):\n    return a + b\n"))
print("repack-probe-ok")
"""


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
    from .cache import cache_root

    return cache_root() / "probes" / f"repack-{commit}-{cpu_fingerprint()}.json"


def probe_repack(tc: Toolchain, work: Path) -> RepackDecision:
    """Quantize the built-in demo model to Q4_0 and load it with repacking on, in a child process."""
    from .gguf import convert_to_gguf
    from .zoo import DEMO_MODEL

    f16, _ = convert_to_gguf(DEMO_MODEL, work / "demo.F16.gguf", dtype="f16")
    q4 = work / "demo.Q4_0.gguf"
    tc.run("llama-quantize", [f16, q4, "Q4_0"], timeout=600)
    proc = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT, str(q4)], capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    if proc.returncode == 0 and "repack-probe-ok" in proc.stdout:
        return RepackDecision(True, "works on this CPU")
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        return RepackDecision(False, f"faults on this CPU, {sig}")
    raise ToolchainError(f"the weight-repacking probe failed (exit {proc.returncode}): "
                         f"{last_error_line(proc.stderr or proc.stdout)}")


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
    from .fsutil import write_json

    log.info("checking once whether llama.cpp's weight repacking works on this CPU")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".repack-probe-") as work:
        try:
            decision = probe_repack(tc, Path(work))
        except (ToolchainError, subprocess.TimeoutExpired) as e:   # undecided: stay safe, probe again next time
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
    import llama_cpp.llama_cpp as capi
    from llama_cpp import Llama

    kwargs.setdefault("verbose", False)
    if repack_decision().on:
        return Llama(model_path=str(path), **kwargs)
    with _LOAD_LOCK:
        original = capi.llama_model_default_params

        def no_repack():
            params = original()
            params.use_extra_bufts = False
            return params

        capi.llama_model_default_params = no_repack
        try:
            return Llama(model_path=str(path), **kwargs)
        finally:
            capi.llama_model_default_params = original


_LOAD_LOCK = threading.Lock()


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


PYTHON_PACKAGES = ("torch", "transformers", "gguf", "numpy", "safetensors", "tokenizers", "sentencepiece",
                   "huggingface_hub")


def doctor_checks() -> list[Check]:
    """Everything reamkit needs, each with its version or path, or the one-line fix."""
    checks: list[Check] = []
    try:
        p = pins()
    except ToolchainError as e:
        return [Check("version pins", False, e.problem, e.fix or FIX)]
    for dist in PYTHON_PACKAGES:
        v = installed_version(dist)
        pin = p.packages.get(_norm(dist))
        if v is None:
            checks.append(Check(dist, False, "not installed", FIX))
        elif pin and v.split("+")[0] != pin:
            checks.append(Check(dist, False, f"{v} (reamkit pins {pin})", FIX))
        else:
            checks.append(Check(dist, True, v))
    try:
        import torch

        flavour_file = Path(sys.prefix) / ".reamkit-torch"
        flavour = flavour_file.read_text().strip() if flavour_file.is_file() else "cpu"
        if torch.version.cuda and flavour == "cuda":
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            checks.append(Check("torch build", True, f"CUDA {torch.version.cuda} build {torch.__version__} "
                                                     f"(REAMKIT_TORCH=cuda); GPUs visible: {gpus}"))
        elif torch.version.cuda:
            checks.append(Check("torch build", False, f"CUDA build {torch.__version__} that nothing asked for",
                                f"reinstall the CPU build of torch: {FIX} (or REAMKIT_TORCH=cuda {FIX} to keep it)"))
        else:
            checks.append(Check("torch build", True, f"CPU ({torch.__version__})"))
    except ImportError:
        pass
    try:
        tc = find_toolchain()
    except ToolchainError as e:
        checks.append(Check("llama.cpp", False, e.problem, e.fix or FIX))
        return checks
    checks.append(Check("llama-cpp-python", True, installed_version("llama_cpp_python") or "?"))
    checks.append(Check("llama.cpp commit", True, f"{tc.commit} (reported by the built tools)"))
    sha = built_sdist_sha256(tc)
    if sha == p.sdist_sha256:
        checks.append(Check("llama.cpp source", True, f"sdist sha256 {sha[:16]}... as pinned"))
    else:
        checks.append(Check("llama.cpp source", False,
                            f"built from an sdist with sha256 {sha or 'unrecorded'}, reamkit pins {p.sdist_sha256}",
                            FIX))
    for name in TOOLS:
        checks.append(Check(name, True, str(tc.tool(name))))
    checks.append(Check("convert_hf_to_gguf.py", True, str(tc.converter)))
    try:
        rd = repack_decision()
        checks.append(Check("weight repacking", True, f"{'on' if rd.on else 'off'} ({rd.reason})"))
    except ToolchainError as e:
        checks.append(Check("weight repacking", False, e.problem, e.fix or FIX))
    return checks
