#!/usr/bin/env bash
# Usage: bash run.sh demo [args...]   install, then run bench/demo.py
#        bash run.sh test [args...]   install, then run the test suite (pytest args pass through)
#
# The install step is safe to repeat: it installs effattn in editable mode once per checkout
# (so `import effattn` works from any directory), and afterwards only rebuilds
# effattn/_C.abi3.so in place against the installed torch (incremental, via ninja).
# PYTHON=/path/to/python picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# The package directory that `import effattn` finds outside this checkout (empty: none).
installed_effattn() {
  (cd / && "$PY" -c 'import importlib.util as u, os; s = u.find_spec("effattn")
print(os.path.realpath(s.submodule_search_locations[0]) if s else "")')
}

install() {
  # setuptools >= 70.1 (bdist_wheel built in): the build requirement --no-build-isolation skips.
  "$PY" -m pip install -q "torch>=2.10" ninja pytest numpy hypothesis "setuptools>=70.1"
  if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]]; then
    export CUDA_HOME=/usr/local/cuda  # torch's cpp_extension guesses /usr/local otherwise
  fi
  if [[ "$(installed_effattn)" == "$(pwd -P)/effattn" ]]; then
    "$PY" setup.py -q build_ext --inplace
  else
    "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  fi
}

case "${1:-}" in
  demo) shift; install; "$PY" bench/demo.py "$@" ;;
  test) shift; install; "$PY" -m pytest -q -ra "$@" ;;  # no path given: pyproject testpaths = tests
  *) echo "usage: bash run.sh {demo|test} [args...]" >&2; exit 2 ;;
esac
