#!/bin/bash
# Copies what a GPU run needs (the built package, the CUDA tests, these
# scripts) into $1 (default /work/main/.carry_cuda), for the device tool.
set -e
SRC="$(cd "$(dirname "$0")/../../.." && pwd)"
DST=${1:-/work/main/.carry_cuda}
rm -rf "$DST"; mkdir -p "$DST/tests" "$DST/dev"
cp -r "$SRC/effattn" "$DST/" && find "$DST" -name __pycache__ -prune -exec rm -rf {} +
cp "$SRC/tests/conftest.py" "$SRC/tests/test_cuda.py" "$DST/tests/"
cp "$SRC"/csrc/cuda/dev/*.py "$SRC"/csrc/cuda/dev/*.sh "$DST/dev/"
du -sh "$DST"
