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
# Variant builds given as extra arguments NAME=DIR (a tree with effattn/_C.abi3.so built).
for nv in "${@:2}"; do
  name=${nv%%=*}; dir=${nv#*=}; mkdir -p "$DST/var/$name"
  cp -r "$dir/effattn" "$DST/var/$name/" && find "$DST/var/$name" -name __pycache__ -prune -exec rm -rf {} +
  strip --strip-debug "$DST/var/$name/effattn/_C.abi3.so"
done
# The Turing tiles' check (gpu_check.sh): SM75_BUILD=DIR, a tree built with EFFATTN_UNVERIFIED=1
# and TORCH_CUDA_ARCH_LIST="7.5+PTX" (its only code: sm_75 SASS and compute_75 PTX).
if [ -n "${SM75_BUILD:-}" ]; then
  mkdir -p "$DST/sm75"
  cp -r "$SM75_BUILD/effattn" "$DST/sm75/" && find "$DST/sm75" -name __pycache__ -prune -exec rm -rf {} +
  strip --strip-debug "$DST/sm75/effattn/_C.abi3.so"
fi
du -sh "$DST"
