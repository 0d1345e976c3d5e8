#!/usr/bin/env bash
# Usage: bash run.sh demo [args...]   install, then run bench/demo.py
#        bash run.sh test [args...]   install, then run the test suite (pytest args pass through)
#
# The install step is safe to repeat: it builds effattn/_C.abi3.so in place against the
# installed torch (incremental, via ninja) and installs effattn in editable mode once per
# checkout, so `import effattn` works from any directory.
# PYTHON=/path/to/python picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

install() {
  # setuptools + wheel: the build requirements, which --no-build-isolation does not fetch.
  "$PY" -m pip install -q "torch>=2.10" ninja pytest numpy "setuptools>=64" wheel
  if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]]; then
    export CUDA_HOME=/usr/local/cuda  # torch's cpp_extension guesses /usr/local otherwise
  fi
  # Where `import effattn` resolves from outside the checkout (empty if nowhere).
  installed=$(cd / && "$PY" -c 'import importlib.util as u; s = u.find_spec("effattn"); import os; print(os.path.realpath(s.submodule_search_locations[0]) if s else "")')
  if [[ "$installed" == "$(pwd -P)/effattn" ]]; then
    "$PY" setup.py -q build_ext --inplace
  else
    "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  fi
}

case "${1:-}" in
  demo) shift; install; "$PY" bench/demo.py "$@" ;;
  test) shift; install; "$PY" -m pytest tests -q -ra "$@" ;;
  *) echo "usage: bash run.sh {demo|test} [args...]" >&2; exit 2 ;;
esac
