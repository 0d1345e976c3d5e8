#!/bin/bash
# One device call: smoke errors, the CUDA tests, compute-sanitizer (memcheck,
# racecheck) on tiny calls, then the benchmark. Run from a folder holding the
# built package (effattn/ with _C.abi3.so), tests/ and this dev/ folder; logs go
# to $OUT.
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton, effattn; print(torch.__version__, triton.__version__, effattn.__file__, hex(torch.ops.effattn.cuda_variants()))"
[ "${SMOKE:-1}" = 1 ] && { echo "== smoke"; timeout 40 python3 dev/smoke.py 2>&1 | tee $OUT/smoke.log; }
echo "== tests"; timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -n ${TEST_WORKERS:-8} -p no:cacheprovider tests/test_cuda.py 2>&1 | tee $OUT/tests.log | tail -40
echo "== memcheck"; timeout ${SAN_TIMEOUT:-45} compute-sanitizer --tool memcheck --print-limit 5 python3 dev/smoke.py --small > $OUT/memcheck.log 2>&1; tail -6 $OUT/memcheck.log
echo "== racecheck"; timeout ${SAN_TIMEOUT:-45} compute-sanitizer --tool racecheck --print-limit 5 python3 dev/smoke.py --small > $OUT/racecheck.log 2>&1; tail -6 $OUT/racecheck.log
for tool in memcheck racecheck; do  # the backward's 99 KB tiles (sm_86/89), forced on this GPU
  echo "== $tool, small backward tiles"
  EFFATTN_CUDA_BWD_TILES=small timeout ${SAN_TIMEOUT:-45} compute-sanitizer --tool $tool --print-limit 5 \
    python3 dev/smoke.py --small > $OUT/$tool-small-tiles.log 2>&1; tail -6 $OUT/$tool-small-tiles.log
done
for var in var/*/; do  # other builds of the package (e.g. tile-size variants): forward at E=128
  [ -d "$var" ] || continue; name=$(basename $var); echo "== variant $name"
  PYTHONPATH=$PWD/$var timeout 60 python3 dev/bench_cuda.py --head-dims 128 --fwd-only --impls effattn-cuda \
    --label "$name-" --json $OUT/var-$name.json 2>&1 | grep "^|"
done
echo "== bench"; timeout ${BENCH_TIMEOUT:-120} python3 dev/bench_cuda.py ${BENCH_ARGS:-} --json $OUT/cuda-bench.json --md $OUT/cuda-bench.md 2>&1 | tail -30
