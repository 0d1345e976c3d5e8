#!/usr/bin/env bash
# The GPU machine's Python stack (torch 2.11.0+cu130, Triton 3.6.0) on the CPU machine, no GPU:
# a virtualenv with those wheels (on local disk here), then, against this checkout and the
# effattn/_C.abi3.so built here (abi3: it loads on torch 2.11 unchanged),
#   1. tests/triton_compiled_on_cpu.py: torch.compile(fullgraph) of effattn.attention on the
#      Triton backend, traced from the real kernels with torch 2.11's kernel analysis, the graphs
#      run interpreted against the float64 oracle;
#   2. the test suite without the Triton interpreter (torch 2.11's wrap_triton cannot launch
#      interpreted kernels): the CPU kernel, the reference, torch.library and dynamo on torch 2.11.
# It answers, before any device time is spent, whether effattn's Python side works on the GPU
# machine's versions. numpy < 2: Triton 3.6's interpreter calls int() on 1-element arrays.
#     bash bench/dev/gpu_stack_on_cpu.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-/tmp/venv-gpu-stack}
if [[ ! -x $VENV/bin/python ]]; then
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 "numpy<2" pytest
fi
"$VENV/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "== 1. torch.compile on the Triton backend (tests/triton_compiled_on_cpu.py)"
"$VENV/bin/python" tests/triton_compiled_on_cpu.py 2>/dev/null | "$VENV/bin/python" -c '
import json, sys
results = json.loads(sys.stdin.read().strip().splitlines()[-1])
for case, got in results.items():
    print(case + ": " + (got["result"] if got["result"] == "ok" else "FAILED\n" + got["result"]))
    for graph in got["graphs"]:
        print("    " + ", ".join(name + " writes " + "/".join(writes) for name, writes in graph))
sys.exit(any(got["result"] != "ok" for got in results.values()))'
echo "== 2. the test suite on torch 2.11, without the interpreter"
EFFATTN_TEST_TRITON_INTERPRET=0 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests \
  --deselect tests/test_wheel.py "$@"
