#!/usr/bin/env bash
# One GPU-machine call for the GPU backends: environment, the test matrix on the GPU
# (pytest-xdist, fixed Triton configs), then, unless SKIP_BENCH=1, the dev benchmark.
# Logs to $OUT. Run from the repo root with effattn/_C.abi3.so carried (built on the CPU
# machine: TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0])"
python3 -c "import effattn; print(effattn.backends())"
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  # -v: one line per test in the log even if the timeout cuts the run short
  EFFATTN_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -v -n 16 -p no:cacheprovider \
    -p no:benchmark -W ignore tests/test_triton.py tests/test_cuda.py tests/test_attention.py \
    -k "${TEST_FILTER:-triton or cuda}" -ra > "$OUT/tests.log" 2>&1
  echo "pytest exit $?"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
  grep -cE " PASSED " "$OUT/tests.log" | sed 's/^/passed: /'
  grep -cE " SKIPPED " "$OUT/tests.log" | sed 's/^/skipped: /'
  tail -n 3 "$OUT/tests.log"
fi
if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 bench/dev/triton_gpu.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  tail -n 70 "$OUT/bench.log"
fi
