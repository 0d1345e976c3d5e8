#!/usr/bin/env bash
# One GPU-machine call for the Triton backend: environment, the test matrix on
# the GPU (pytest-xdist, fixed configs), then the dev benchmark. Logs to $OUT.
# Run from the repo root with effattn/_C.abi3.so carried (built on the CPU machine).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0])"
python3 -c "import effattn; print(effattn.backends())"
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  EFFATTN_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -n 16 -p no:cacheprovider \
    tests/test_triton.py tests/test_attention.py -k "${TEST_FILTER:-triton}" -ra 2>&1 | tee "$OUT/tests.log" | tail -n 25
fi
timeout "${BENCH_TIMEOUT:-300}" python3 bench/dev/triton_gpu.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -n 60
