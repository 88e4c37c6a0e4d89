"""The one pinned llama.cpp: locate its tools and converter, report versions, run tools with clean errors.

``scripts/bootstrap.sh`` builds llama-cpp-python 0.3.36 (vendoring llama.cpp 0c1e57098) once into a cache
outside the repo, as one wheel carrying the Python bindings and the tools, and keeps the same source's
``convert_hf_to_gguf.py`` + ``conversion/`` + ``gguf-py/`` next to it. Converter, quantizer, imatrix,
perplexity, bench and server therefore all come from one llama.cpp commit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from .errors import ToolchainError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-server")
FIX = "run scripts/bootstrap.sh"
SRC_POINTER = "reamkit-llama-cpp-src"   # file in the venv naming the converter source folder


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
        cmd = [str(self.tool(name)), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
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
    """The pinned toolchain, or a one-line ToolchainError saying how to get it."""
    version = installed_version("llama_cpp_python")
    if version is None:
        raise ToolchainError("llama-cpp-python is not installed", fix=FIX)
    if version != LLAMA_CPP_PYTHON_VERSION:
        raise ToolchainError(f"llama-cpp-python {version} is installed, reamkit pins {LLAMA_CPP_PYTHON_VERSION}", fix=FIX)
    src = src_dir()
    commit_file = src.parent / "commit.txt"
    commit = commit_file.read_text().strip() if commit_file.is_file() else LLAMA_CPP_COMMIT
    tc = Toolchain(bin_dir=bin_dir(), src_dir=src, commit=commit)
    for name in TOOLS:
        tc.tool(name)
    return tc


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
        raise ToolchainError(f"llama-server --version failed: {last_error_line(text)}", fix=FIX)
    return m.group(1)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def doctor_checks() -> list[Check]:
    """Everything reamkit needs, each with its version or path, or the one-line fix."""
    checks: list[Check] = []
    pins = {"torch": "2.13.0", "transformers": "5.23.", "gguf": "0.19.0", "safetensors": None,
            "tokenizers": None, "sentencepiece": None, "huggingface_hub": None}
    for dist, pin in pins.items():
        v = installed_version(dist)
        if v is None:
            checks.append(Check(dist, False, "not installed", FIX))
        elif pin and not v.startswith(pin):
            checks.append(Check(dist, False, f"{v} (reamkit pins {pin}*)", FIX))
        else:
            checks.append(Check(dist, True, v))
    try:
        import torch

        if torch.version.cuda:
            checks.append(Check("torch build", False, f"CUDA build {torch.__version__}", "reinstall torch==2.13.0+cpu: " + FIX))
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
    try:
        built = tool_build(tc)
        ok = built.startswith(LLAMA_CPP_COMMIT[:7])
        checks.append(Check("llama.cpp commit", ok, built if ok else f"{built} (expected {LLAMA_CPP_COMMIT})", "" if ok else FIX))
    except ToolchainError as e:
        checks.append(Check("llama.cpp commit", False, e.problem, FIX))
    for name in TOOLS:
        checks.append(Check(name, True, str(tc.tool(name))))
    checks.append(Check("convert_hf_to_gguf.py", True, str(tc.converter)))
    return checks
