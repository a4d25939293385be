#!/usr/bin/env bash
# Re-resolve the dependencies against the newest releases and write constraints.txt, the lock that
# scripts/test.sh (and so CI) installs from. Run it deliberately, then run `scripts/test.sh` and
# commit constraints.txt only if the suite passes: a registry release then changes main only
# through a commit. Uses a throw-away venv; the project's own .venv is not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
"$tmp/venv/bin/python" -m pip install --quiet ".[dev]"
{
  echo "# The lock: exact versions scripts/test.sh and CI install (pip -c, also in build environments via"
  echo "# PIP_CONSTRAINT). Written by scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$PY" --version)."
  echo "# 'scripts/test.sh --latest' runs the suite against the newest releases instead."
  "$tmp/venv/bin/python" -m pip freeze --all --exclude scepsy_hpc | grep -v '^-e ' | LC_ALL=C sort -f
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
