"""The one pinned llama.cpp: its version pins, where its tools and converter are, and the commit they report.

``scripts/bootstrap.sh`` builds the pinned llama-cpp-python sdist (its sha256 checked first) once into a cache
outside the repo, as one wheel carrying the Python bindings and the tools, and keeps the same source's
``convert_hf_to_gguf.py`` + ``conversion/`` + ``gguf-py/`` next to it. Converter, quantizer, imatrix,
perplexity, bench and server therefore all come from one llama.cpp commit, which the tools themselves report.

Every version comes from ``constraints.txt`` (:func:`pins`); nothing here repeats one. The tools run through
:mod:`.tools` (by name) and :mod:`.process` (every process), whether weight repacking works is :mod:`.repack`'s
decision, and ``reamkit doctor`` is :mod:`.doctor`.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from ..errors import ToolchainError
from .process import last_error_line, run

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

    def pinned(self, dist: str) -> str | None:
        """The pinned version of ``dist``, or None where constraints.txt pins none."""
        return self.packages.get(_norm(dist))

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
    for candidate in (Path(__file__).resolve().parents[3] / CONSTRAINTS,
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
    done = run([tc.tool("llama-server"), "--version"], name="llama-server", timeout=60, check=False)
    text = done.text
    m = re.search(r"commit ([0-9a-f]{7,40})", text)
    if done.returncode != 0 or not m:
        raise ToolchainError(f"llama-server --version does not report its commit: {last_error_line(text)}", fix=FIX)
    return m.group(1)


def built_sdist_sha256(tc: Toolchain) -> str | None:
    """sha256 of the llama-cpp-python sdist this toolchain was built from, as the bootstrap recorded it."""
    f = tc.src_dir.parent / SDIST_SHA_FILE
    return f.read_text().split()[0] if f.is_file() else None
