#!/usr/bin/env bash
# The demo model's GPU run, in three steps (issue: "A small trained qwen3_next coding model").
#
#   tools/demo_gpu.sh prepare        here (CPU, ~1 min): corpus, tokenizer, demo-data/tokens.npz, and the
#                                    transformers 5.23.0 wheel the device lacks (it has 5.17), in demo-data/
#   tools/demo_gpu.sh device         ON THE GPU MACHINE, via the device tool's run with carry ["demo-data"]:
#                                    trains for --time-budget seconds and puts the model folder into $OUT as
#                                    tar parts of <= 15 MB (the device returns at most 8 files of 16 MB)
#   tools/demo_gpu.sh unpack DIR     here: reassemble the returned parts (DIR = the run's files_at) into
#                                    demo-out/demo-coder
#
# The device machine cannot download anything, so everything it needs travels in demo-data/ (gitignored).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=demo-data
BUDGET="${BUDGET:-330}"

case "${1:-}" in
  prepare)
    .venv/bin/python tools/train_demo_model.py prepare -o "$DATA"
    rm -rf "$DATA/wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$DATA/wheels" transformers==5.23.0
    du -sh "$DATA"
    ;;
  device)
    : "${OUT:?run this on the device machine, where OUT is set}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$DATA"/wheels/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 tools/train_demo_model.py train --data "$DATA" -o /tmp/demo-coder --steps auto --time-budget "$BUDGET" \
      2>&1 | grep -v "falling back to its reference" | tee "$OUT/train.log"
    cp /tmp/demo-coder/training.json "$OUT/"
    tar -C /tmp -cf - demo-coder | split -b 15M -d - "$OUT/demo-coder.tar.part-"
    ls -la "$OUT"
    ;;
  unpack)
    src="${2:?usage: tools/demo_gpu.sh unpack DIR}"
    rm -rf demo-out/demo-coder && mkdir -p demo-out
    cat "$src"/demo-coder.tar.part-* | tar -C demo-out -xf -
    ls -la demo-out/demo-coder
    ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
