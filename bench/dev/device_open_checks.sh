#!/usr/bin/env bash
# The GPU checks that keep issues 3 (Triton) and 5 (CUDA C++) open, in three
# device calls of under 10 minutes each: PARTS="1 2 3" (about 8.5 min at most),
# PARTS="4 5" (about 6 min) and PARTS=6 (about 8.5 min at most). Logs and JSON go to $OUT.
# Carry effattn/_C.abi3.so built here for sm_90:
#   CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0a EFFATTN_UNVERIFIED=1 python3 setup.py build_ext --inplace
# (EFFATTN_UNVERIFIED=1: the Hopper kernels, which part 6 checks, are built only when asked).
# and pass EFFATTN_COMMIT=<short hash> (the device copy's git HEAD is stale).
# Parts (each time-limited):
#   1. tests/test_triton.py on the GPU: torch.compile(fullgraph) forward+backward (static and
#      dynamic shapes), every config of the autotune lists compiled and checked, the
#      autotuned launch, long sequences, 2^20 keys, peak memory, and the TMA loads.
#   2. tests/test_cuda.py: every head dim forward and backward (192/256 new), both
#      backward tile sets (large, and the 99 KB "small" forced), masks, lengths, GQA.
#   3. compute-sanitizer memcheck/racecheck on small CUDA calls, both tile sets.
#   4. the Triton/CUDA part of the shared matrix (tests/test_attention.py): masks,
#      lengths, windows, fully masked rows, return_lse on the GPU.
#   5. the issue-3 grid, bf16 and fp16, with effattn+tma next to effattn.
#   6. the Hopper kernels (csrc/cuda/flash_{fwd,bwd}_sm90_kernel.h, built with 9.0a in the
#      arch list): their tests, smoke errors, compute-sanitizer, speed (about 8.5 min at most).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PARTS=${PARTS:?say which parts: PARTS="1 2 3", PARTS="4 5" or PARTS=6}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton, sys, effattn; print('torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0]); print(effattn.backends())" | tee -a "$OUT/env.txt"
pytest_gpu() {  # name, timeout, pytest args...
  local name=$1 limit=$2; shift 2
  EFFATTN_TRITON_AUTOTUNE=${AUTOTUNE:-0} timeout "$limit" python3 -m pytest -v -n 16 -p no:cacheprovider \
    -W ignore -ra "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: pytest exit $? ($(grep -c ' PASSED' "$OUT/$name.log") passed, $(grep -c ' SKIPPED' "$OUT/$name.log") skipped)"
  grep -E "^(FAILED|ERROR)" "$OUT/$name.log" | head -20
}
for part in $PARTS; do
  case $part in
    1) pytest_gpu triton-tests 200 tests/test_triton.py ;;
    2) pytest_gpu cuda-tests 120 tests/test_cuda.py ;;
    3) for tiles in large small; do for tool in memcheck racecheck; do
         [[ $tiles == small ]] && export EFFATTN_CUDA_BWD_TILES=small || unset EFFATTN_CUDA_BWD_TILES
         timeout 45 compute-sanitizer --tool $tool --print-limit 5 python3 csrc/cuda/dev/smoke.py --small \
           > "$OUT/$tool-$tiles.log" 2>&1
         echo "== $tool ($tiles tiles): $(tail -n 1 "$OUT/$tool-$tiles.log")"
       done; done; unset EFFATTN_CUDA_BWD_TILES ;;
    4) pytest_gpu matrix 200 tests/test_attention.py -k "triton or cuda" ;;
    5) timeout 150 python3 bench/dev/triton_gpu.py --out "$OUT" --dtypes bf16,fp16 --dims 128,64 \
         --lengths 4096,16384,1024,8192,2048 --methods effattn,effattn+tma,flash,cudnn --max-seconds 130 \
         > "$OUT/bench.log" 2>&1; tail -n 40 "$OUT/bench.log" ;;
    6) python3 -c "from effattn.backends import cuda; assert cuda.sm90_kernels_compiled(), 'built without 9.0a'" \
         || { echo "== part 6: no Hopper kernels in this build"; continue; }
       timeout 60 python3 csrc/cuda/dev/smoke.py --sm90 > "$OUT/sm90-smoke.log" 2>&1  # first: errors at a glance
       echo "== sm90 smoke:"; tail -n 15 "$OUT/sm90-smoke.log"
       pytest_gpu sm90-tests 150 tests/test_cuda.py -k "sm90"
       for tool in memcheck racecheck; do
         timeout 45 compute-sanitizer --tool $tool --print-limit 5 python3 csrc/cuda/dev/smoke.py --small --sm90 \
           > "$OUT/sm90-$tool.log" 2>&1
         echo "== sm90 $tool: $(tail -n 1 "$OUT/sm90-$tool.log")"
       done
       timeout 200 python3 csrc/cuda/dev/bench_cuda.py --json "$OUT/sm90-bench.json" --md "$OUT/sm90-bench.md" \
         --impls effattn-cuda,effattn-cuda-sm90,sdpa-flash,sdpa-cudnn > "$OUT/sm90-bench.log" 2>&1
       tail -n 22 "$OUT/sm90-bench.log" ;;
  esac
done
