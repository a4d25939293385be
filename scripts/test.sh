#!/usr/bin/env bash
# The test command: creates .venv if absent, installs the package with its test dependencies, runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k sim -x).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet -e ".[dev]"
exec .venv/bin/python -m pytest "$@"
