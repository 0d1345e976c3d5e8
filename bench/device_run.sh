#!/usr/bin/env bash
# The four GPU benchmarks in one go, for the GPU machine (H100 / H200), in about 6 minutes.
#
#   bash bench/device_run.sh                 # from the repository root; effattn/_C.abi3.so built (carried)
#   QUICK=1 DEVICE=cpu bash bench/device_run.sh          # the same flow as a seconds-long CPU smoke run
#   EFFATTN_BENCH_FAKE_CUDA=1 QUICK=1 bash bench/device_run.sh   # the CUDA code paths on CPU tensors (tests)
#
# Results go to $OUT (the device tool's folder; default bench/results/device-run, git-ignored): few files, since at
# most 8 come back: bench-<device>.tar.gz (every JSON, PNG and markdown table), run.log (all output),
# and the four JSON files (copied as each script ends, so a call cut short keeps them). Unpack with: tar xzf bench-cuda.tar.gz -C bench/results
# Each script has a wall-clock budget (--max-seconds: cells not reached are recorded as skipped)
# and a hard timeout a little above it. Environment overrides: DEVICE (cuda), QUICK (0),
# SPEED_S MEMORY_S BUDGET_S CRNN_S (the budgets), MEMORY_METHODS and BUDGET_METHODS (--methods),
# SPEED_EXTRA and BUDGET_EXTRA (more arguments, e.g. --no-flex, --causal).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench/results/device-run}
SPEED_S=${SPEED_S:-130}
MEMORY_S=${MEMORY_S:-45}
BUDGET_S=${BUDGET_S:-130}
CRNN_S=${CRNN_S:-50}
# FlexAttention compiles per shape (until shapes go dynamic) and per mask kind, 5-20 s each: it is
# timed in speed.py only; memory.py and budget.py (a new L every trial) leave it out here
MEMORY_METHODS=${MEMORY_METHODS:-effattn,naive,sdpa,xformers}
BUDGET_METHODS=${BUDGET_METHODS:-effattn,sdpa:flash,naive,sdpa:efficient,sdpa:cudnn,sdpa:math}
QUICK_ARG=()
SUFFIX=""
if [ "${QUICK:-0}" = 1 ]; then QUICK_ARG=(--quick); SUFFIX="-quick"; fi
mkdir -p "$OUT"
RES=$(mktemp -d)
LOG="$OUT/run.log"
: > "$LOG"
t0=$(date +%s)

say() { echo "== $* ($(( $(date +%s) - t0 )) s)" | tee -a "$LOG"; }

say "device_run.sh: $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(hostname)"
python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, effattn
print("effattn from", effattn.__file__, "| torch", torch.__version__,
      "| cuda", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print(effattn.backends())
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"

run() {  # run NAME BUDGET_S ARGS...: one script, its own budget, a hard timeout 25 s above it
    local name=$1 secs=$2; shift 2
    say "bench/$name.py (budget ${secs} s)"
    timeout --kill-after=5 $(( ${secs%.*} + 25 )) python3 "bench/$name.py" --device "$DEVICE" --out "$RES" \
        --max-seconds "$secs" "${QUICK_ARG[@]}" "$@" > "$RES/$name.log" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && echo "bench/$name.py exited with $rc" | tee -a "$RES/$name.log"
    grep -E '^\[[0-9]+/[0-9]+\]|^check .*(invalid|error)|exited with' "$RES/$name.log" | tee -a "$LOG"
    cp "$RES"/$name-*.json "$OUT/" 2>/dev/null  # at once: a call cut short still brings back what finished
}

run speed "$SPEED_S" ${SPEED_EXTRA:-}
run memory "$MEMORY_S" --methods "$MEMORY_METHODS"
run budget "$BUDGET_S" --methods "$BUDGET_METHODS" ${BUDGET_EXTRA:-}
run crnn "$CRNN_S"

say "done; tables follow"
for name in speed memory budget crnn; do
    md=$(ls "$RES"/$name-*.md 2>/dev/null | head -1)
    if [ -n "$md" ]; then cat "$md" | tee -a "$LOG"; else
        echo "no table from $name.py; the end of its log:" | tee -a "$LOG"; tail -20 "$RES/$name.log" | tee -a "$LOG"; fi
    echo | tee -a "$LOG"
done
cat "$RES"/*.log > "$RES/all-scripts.log"
tar czf "$OUT/bench-$DEVICE$SUFFIX.tar.gz" -C "$RES" .
rm -rf "$RES"
say "wrote $OUT: $(ls "$OUT" | tr '\n' ' ')"
