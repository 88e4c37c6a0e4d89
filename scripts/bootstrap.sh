#!/usr/bin/env bash
# Idempotent set-up: .venv with the pinned dependencies, and the pinned llama.cpp (the llama-cpp-python
# sdist named in constraints.txt, its sha256 checked) built ONCE into a cache outside the repo as one wheel
# carrying the bindings and the tools, plus the same source's converter.
#
#   scripts/bootstrap.sh            set up (a warm machine takes well under a minute)
#
# Every version comes from constraints.txt, the supported Pythons from pyproject.toml's requires-python,
# and the cache root from reamkit.cache: nothing is repeated here.
#
# Environment:
#   REAMKIT_CACHE_DIR        cache root (default: ${XDG_CACHE_HOME:-~/.cache}/reamkit)
#   REAMKIT_TORCH            cpu (default) or cuda: the CUDA build of the pinned torch for GPU compression
#                            (asked for explicitly; otherwise nothing may pull a CUDA torch)
#   REAMKIT_LLAMA_CMAKE_ARGS extra CMake flags for llama.cpp, e.g. "-DGGML_CUDA=ON" on a GPU box
#                            (part of the cache key, so each flavour is built once)
#   PYTHON                   interpreter for the venv (default: python3.11, else python3.12, 3.13, python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

say() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }
# pin NAME: the exact version constraints.txt gives NAME; extra KEY: a "# pin: KEY VALUE" line's value
pin() { sed -n "s/^$1==\([^ ;#]*\).*/\1/p" constraints.txt | head -n1; }
extra() { sed -n "s/^# *pin: *$1  *\([^ ]*\).*/\1/p" constraints.txt | head -n1; }
LLAMA_CPP_PYTHON_VERSION=$(pin llama-cpp-python)
LLAMA_CPP_COMMIT=$(extra llama.cpp-commit)
SDIST_SHA256=$(extra llama-cpp-python-sdist-sha256)
TORCH_VERSION=$(pin torch)
[ -n "$LLAMA_CPP_PYTHON_VERSION" ] && [ -n "$LLAMA_CPP_COMMIT" ] && [ -n "$SDIST_SHA256" ] && [ -n "$TORCH_VERSION" ] \
  || die "constraints.txt lacks a pin (llama-cpp-python, torch, or the llama.cpp sdist sha256 / commit lines)"

# ---------------------------------------------------------------- python + venv
REQUIRES_PYTHON=$(sed -n 's/^requires-python *= *"\([^"]*\)".*/\1/p' pyproject.toml)
# exit 0 when the interpreter $1 satisfies requires-python (">=3.11,<3.14")
python_ok() {
  "$1" - "$REQUIRES_PYTHON" <<'PYEOF' 2>/dev/null
import re, sys
v = sys.version_info[:2]
for op, major, minor in re.findall(r"([<>]=?|==)\s*(\d+)\.(\d+)", sys.argv[1]):
    b = (int(major), int(minor))
    if not {"<": v < b, "<=": v <= b, ">": v > b, ">=": v >= b, "==": v == b}[op]:
        sys.exit(1)
PYEOF
}
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
else
  PY=""
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null && python_ok "$(command -v "$cand")"; then PY="$(command -v "$cand")"; break; fi
  done
  [ -n "$PY" ] || die "no Python matching $REQUIRES_PYTHON found (3.11 preferred); install one or set PYTHON=/path/to/python3.11"
fi
python_ok "$PY" || die "reamkit needs Python $REQUIRES_PYTHON, $("$PY" --version 2>&1) found; set PYTHON=/path/to/python3.11"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating .venv"
  "$PY" -m venv "$VENV"
fi

# ---------------------------------------------------------------- pinned python deps
# Stamp = hash of everything that decides the install; a warm venv skips pip entirely.
TORCH_FLAVOUR="${REAMKIT_TORCH:-cpu}"
case "$TORCH_FLAVOUR" in cpu|cuda) ;; *) die "REAMKIT_TORCH must be cpu or cuda, not '$TORCH_FLAVOUR'";; esac
deps_key=$( (cat constraints.txt pyproject.toml; echo "$TORCH_FLAVOUR") | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.reamkit-deps" 2>/dev/null)" != "$deps_key" ]; then
  "${PIP[@]}" install -U "pip>=24"
  if [ "$TORCH_FLAVOUR" = cuda ]; then
    say "installing pinned dependencies (torch $TORCH_VERSION CUDA build, as REAMKIT_TORCH=cuda asks)"
    # PyPI's plain torch wheel for Linux is the CUDA build.
    "${PIP[@]}" install -c constraints.txt "torch==$TORCH_VERSION"
  else
    say "installing pinned dependencies (torch $TORCH_VERSION CPU build first, so nothing pulls a CUDA torch)"
    # torch==X+cpu comes from the PyTorch CPU index (or a local wheel via pip's find-links);
    # PyPI's plain torch is a CUDA build on Linux, which we never want by accident.
    "${PIP[@]}" install -c constraints.txt "torch==$TORCH_VERSION+cpu" --retries 1 --timeout 20 \
      --extra-index-url https://download.pytorch.org/whl/cpu
  fi
  "${PIP[@]}" install -c constraints.txt -e ".[dev]"
  "$VENV/bin/python" - "$TORCH_VERSION" "$TORCH_FLAVOUR" <<'PYEOF' \
    || die "torch is not the $TORCH_VERSION $TORCH_FLAVOUR build: $("$VENV/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
import sys, torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and bool(torch.version.cuda) == (sys.argv[2] == "cuda") else 1)
PYEOF
  echo "$TORCH_FLAVOUR" > "$VENV/.reamkit-torch"
  echo "$deps_key" > "$VENV/.reamkit-deps"
else
  say "python dependencies up to date"
fi

# ---------------------------------------------------------------- pinned llama.cpp
CACHE=$("$VENV/bin/python" -m reamkit.cache)
CMAKE_ARGS_PINNED="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAMA_BUILD_SERVER=ON \
-DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
-DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_NUMBER=0 -DLLAMA_BUILD_COMMIT=$LLAMA_CPP_COMMIT \
-DCMAKE_INSTALL_RPATH=\$ORIGIN/../lib ${REAMKIT_LLAMA_CMAKE_ARGS:-}"
# GGML_NATIVE is on (fast on this host), so the key includes the CPU's feature flags.
cpu_flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-8)
build_key=$(printf '%s|%s|%s|%s|%s' "$LLAMA_CPP_PYTHON_VERSION" "$SDIST_SHA256" "$CMAKE_ARGS_PINNED" "$(uname -m)" "$cpu_flags" \
  | sha256sum | cut -c1-12)
TC="$CACHE/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$build_key"
WHEEL_DIR="$TC/wheel"
SRC_DIR="$TC/llama.cpp"          # converter + gguf-py of the same commit
mkdir -p "$CACHE"

if [ ! -f "$TC/.complete" ]; then
  say "building llama.cpp $LLAMA_CPP_COMMIT (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION) once into $TC (about 7 min on 2 cores)"
  tmp=$(mktemp -d "$CACHE/.build-XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  "${PIP[@]}" download --no-deps --no-binary :all: -d "$tmp/sdist" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  sdist=$(ls "$tmp"/sdist/llama_cpp_python-*.tar.gz)
  got_sha=$(sha256sum "$sdist" | cut -d' ' -f1)
  [ "$got_sha" = "$SDIST_SHA256" ] \
    || die "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist has sha256 $got_sha, constraints.txt pins $SDIST_SHA256; not building it"
  tar -xzf "$sdist" -C "$tmp"
  pkg="$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
  vendor="$pkg/vendor/llama.cpp"
  # the llama.cpp commit this release vendors, from its own changelog entry
  vendored=$(sed -n "/^## \[$LLAMA_CPP_PYTHON_VERSION\]/,/^## \[/p" "$pkg/CHANGELOG.md" | grep -o 'llama\.cpp@[0-9a-f]*' | head -n1 | cut -d@ -f2)
  [ "$vendored" = "$LLAMA_CPP_COMMIT" ] \
    || die "the sdist vendors llama.cpp ${vendored:-(unknown)}, constraints.txt pins $LLAMA_CPP_COMMIT"
  [ -f "$vendor/convert_hf_to_gguf.py" ] || die "sdist has no vendor/llama.cpp/convert_hf_to_gguf.py"
  mkdir -p "$tmp/out/llama.cpp"
  cp -r "$vendor/convert_hf_to_gguf.py" "$vendor/conversion" "$vendor/gguf-py" "$vendor/LICENSE" "$tmp/out/llama.cpp/"
  # scikit-build-core needs cmake + ninja; use the system ones when present.
  command -v cmake >/dev/null || "${PIP[@]}" install -c constraints.txt cmake
  command -v ninja >/dev/null || "${PIP[@]}" install -c constraints.txt ninja
  # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back a tool-less wheel.
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" CMAKE_ARGS="$CMAKE_ARGS_PINNED" \
    "$VENV/bin/python" -m pip --disable-pip-version-check wheel --no-deps --no-cache-dir \
      -w "$tmp/out/wheel" "$sdist" > "$tmp/build.log" 2>&1 \
    || { tail -n 40 "$tmp/build.log" >&2; die "llama.cpp build failed (log above)"; }
  printf '%s\n' "$CMAKE_ARGS_PINNED" > "$tmp/out/cmake_args.txt"
  echo "$got_sha  $(basename "$sdist")" > "$tmp/out/sdist.sha256"
  cp "$tmp/build.log" "$tmp/out/build.log"
  touch "$tmp/out/.complete"
  rm -rf "$TC"
  mv "$tmp/out" "$TC"             # atomic publish: a killed build leaves no half cache
  rm -rf "$tmp"; trap - EXIT
fi

wheel=$(ls "$WHEEL_DIR"/llama_cpp_python-*.whl)
if [ "$(cat "$VENV/.reamkit-llama" 2>/dev/null)" != "$build_key" ]; then
  say "installing cached llama.cpp wheel"
  "${PIP[@]}" install --no-deps --force-reinstall "$wheel"
  # the [server] extra's pure-Python deps; the wheel above already satisfies llama-cpp-python itself
  "${PIP[@]}" install -c constraints.txt --find-links "$WHEEL_DIR" "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
  echo "$build_key" > "$VENV/.reamkit-llama"
fi
# Tell reamkit where the converter of the same commit lives.
printf '%s\n' "$SRC_DIR" > "$VENV/reamkit-llama-cpp-src"
say "ready: $VENV (llama.cpp $LLAMA_CPP_COMMIT from $TC)"
