#!/usr/bin/env bash
# Idempotent set-up: .venv with the pinned dependencies, and the pinned llama.cpp
# (llama-cpp-python 0.3.36 = llama.cpp 0c1e57098) built ONCE into a cache outside the repo
# as one wheel carrying the bindings and the tools, plus the same source's converter.
#
#   scripts/bootstrap.sh            set up (a warm machine takes well under a minute)
#
# Environment:
#   REAMKIT_CACHE_DIR        cache root (default: ${XDG_CACHE_HOME:-~/.cache}/reamkit)
#   REAMKIT_LLAMA_CMAKE_ARGS extra CMake flags for llama.cpp, e.g. "-DGGML_CUDA=ON" on a GPU box
#                            (part of the cache key, so each flavour is built once)
#   PYTHON                   interpreter for the venv (default: python3.11, else python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_COMMIT=0c1e57098
CACHE="${REAMKIT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/reamkit}"
VENV="$ROOT/.venv"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

say() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- python + venv
PY="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
[ -n "$PY" ] || die "no python3 found; install Python 3.11"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
  || die "Python 3.11 required, $("$PY" --version 2>&1) found; set PYTHON=/path/to/python3.11"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating .venv"
  "$PY" -m venv "$VENV"
fi

# ---------------------------------------------------------------- pinned python deps
# Stamp = hash of everything that decides the install; a warm venv skips pip entirely.
deps_key=$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.reamkit-deps" 2>/dev/null)" != "$deps_key" ]; then
  say "installing pinned dependencies (torch 2.13.0 CPU build first, so nothing pulls a CUDA torch)"
  "${PIP[@]}" install -U "pip>=24"
  # torch==2.13.0+cpu comes from the PyTorch CPU index (or a local wheel via pip's find-links);
  # PyPI's plain torch 2.13.0 is a CUDA build on Linux, which we never want.
  "${PIP[@]}" install -c constraints.txt "torch==2.13.0+cpu" --retries 1 --timeout 20 \
    --extra-index-url https://download.pytorch.org/whl/cpu
  "${PIP[@]}" install -c constraints.txt -e ".[dev]"
  "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") and not torch.version.cuda else 1)' \
    || die "torch is not the 2.13.0 CPU build: $("$VENV/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
  echo "$deps_key" > "$VENV/.reamkit-deps"
else
  say "python dependencies up to date"
fi

# ---------------------------------------------------------------- pinned llama.cpp
CMAKE_ARGS_PINNED="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAMA_BUILD_SERVER=ON \
-DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
-DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_NUMBER=0 -DLLAMA_BUILD_COMMIT=$LLAMA_CPP_COMMIT \
-DCMAKE_INSTALL_RPATH=\$ORIGIN/../lib ${REAMKIT_LLAMA_CMAKE_ARGS:-}"
# GGML_NATIVE is on (fast on this host), so the key includes the CPU's feature flags.
cpu_flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-8)
build_key=$(printf '%s|%s|%s|%s' "$LLAMA_CPP_PYTHON_VERSION" "$CMAKE_ARGS_PINNED" "$(uname -m)" "$cpu_flags" | sha256sum | cut -c1-12)
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
  tar -xzf "$sdist" -C "$tmp"
  vendor="$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
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
  echo "$LLAMA_CPP_COMMIT" > "$tmp/out/commit.txt"
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
