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
if [ -d sm75 ]; then
  # The Turing tiles (unverified until this passes): the sm75/ build holds only sm_75 SASS and
  # compute_75 PTX, so on this GPU the driver JIT-compiles the PTX, with ptx.h's sm_75 lowering
  # (two m16n8k8 per m16n8k16, synchronous copies for cp.async); EFFATTN_CUDA_SM75=force takes
  # the Turing tiles (<= 64 KB) here. float16 only: the bfloat16 kernels' sm_75 code traps.
  echo "== Turing tiles: compute_75 PTX through the JIT"
  export EFFATTN_CUDA_SM75=force
  PYTHONPATH=$PWD/sm75 python3 -c "import effattn.backends.cuda as c; assert c.sm75_kernels_compiled(); print(hex(c.compiled_variants()))"
  PYTHONPATH=$PWD/sm75 timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -n ${TEST_WORKERS:-8} -p no:cacheprovider \
    tests/test_cuda.py -k "not bf16" 2>&1 | tee $OUT/sm75-tests.log | tail -15
  for tool in memcheck racecheck; do
    echo "== $tool, Turing tiles"
    PYTHONPATH=$PWD/sm75 timeout ${SAN_TIMEOUT:-45} compute-sanitizer --tool $tool --print-limit 5 \
      python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "fp16 and (test_gqa or test_lengths_masks or test_backward_tiles_window_mask)" \
      > $OUT/sm75-$tool.log 2>&1; tail -6 $OUT/sm75-$tool.log
  done
  unset EFFATTN_CUDA_SM75
fi
echo "== bench"; timeout ${BENCH_TIMEOUT:-120} python3 dev/bench_cuda.py ${BENCH_ARGS:-} --json $OUT/cuda-bench.json --md $OUT/cuda-bench.md 2>&1 | tail -30
