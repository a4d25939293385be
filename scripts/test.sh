#!/usr/bin/env bash
# The test command: creates .venv if absent, installs the package with its test dependencies, starts
# the local Slurm cluster when it can (root; packages installable or present) so the slurm-marked
# tests run, and likewise the two loopback sshds of scripts/sshd-local.sh for the ssh-marked tests
# (sshd installed, or root and apt-get); runs pytest, and stops what it started.
# In CI (CI=true) both must start: a run that cannot start them fails. SCEPSY_NO_SLURM=1 and
# SCEPSY_NO_SSHD=1 skip them elsewhere. Extra arguments go to pytest (e.g. scripts/test.sh -k sim -x).
#
# Which dependency versions (the first argument may pick another set; each set has its own venv):
#   (default)   the lock, constraints.txt, in .venv: what CI runs, so a registry release cannot
#               turn main red overnight (scripts/lock.sh re-resolves it, deliberately)
#   --latest    the newest releases, in .venv-latest: run it before you stop to see what the next
#               lock will bring
#   --lowest    the lower bounds of pyproject.toml, in .venv-lowest: the bounds we claim are tested
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=locked
case "${1:-}" in
  --latest) mode=latest; shift ;;
  --lowest) mode=lowest; shift ;;
esac
venv=.venv
[ "$mode" = locked ] || venv=".venv-$mode"
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
case "$mode" in
  locked)
    # PIP_CONSTRAINT also reaches pip's isolated build environments (setuptools for the editable install)
    export PIP_CONSTRAINT="$PWD/constraints.txt"
    "$venv/bin/python" -m pip install --quiet pip >/dev/null
    "$venv/bin/python" -m pip install --quiet -e ".[dev]"
    ;;
  latest)
    "$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
    ;;
  lowest)
    "$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null
    lowest="$venv/lowest-constraints.txt"
    "$PY" scripts/lower_bounds.py pyproject.toml > "$lowest"
    "$venv/bin/python" -m pip install --quiet -c "$lowest" -e ".[dev]"
    ;;
esac
echo "scripts/test.sh: dependencies: $mode ($venv)" >&2

started_slurm=0
if [ "${CI:-}" = true ] || [ "${SCEPSY_NO_SLURM:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ] && { command -v apt-get >/dev/null || command -v slurmctld >/dev/null; }; then
    was_up=0
    bash scripts/slurm-local.sh status >/dev/null 2>&1 && was_up=1
    if bash scripts/slurm-local.sh start; then
      [ "$was_up" = 1 ] || started_slurm=1
    elif [ "${CI:-}" = true ]; then
      echo "scripts/test.sh: the local Slurm cluster did not start; CI needs it (logs: /var/log/scepsy-slurm/)" >&2
      exit 1
    else
      echo "scripts/test.sh: the local Slurm cluster did not start; the slurm-marked tests will be skipped" >&2
    fi
  elif [ "${CI:-}" = true ]; then
    echo "scripts/test.sh: CI must run the Slurm tests, which need root and apt-get to start a local Slurm" >&2
    exit 1
  fi
fi

started_sshd=0
if [ "${CI:-}" = true ] || [ "${SCEPSY_NO_SSHD:-0}" != 1 ]; then
  if [ -x /usr/sbin/sshd ] || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }; then
    was_up=0
    bash scripts/sshd-local.sh status >/dev/null 2>&1 && was_up=1
    if bash scripts/sshd-local.sh start; then
      [ "$was_up" = 1 ] || started_sshd=1
    elif [ "${CI:-}" = true ]; then
      echo "scripts/test.sh: the local sshd servers did not start; CI needs them (their log tails are above)" >&2
      exit 1
    else
      echo "scripts/test.sh: the local sshd servers did not start; the ssh-marked tests will be skipped" >&2
    fi
  elif [ "${CI:-}" = true ]; then
    echo "scripts/test.sh: CI must run the ssh tests, which need openssh-server, or root and apt-get to install it" >&2
    exit 1
  fi
fi

rc=0
"$venv/bin/python" -m pytest "$@" || rc=$?
if [ "$started_slurm" = 1 ]; then
  bash scripts/slurm-local.sh stop >/dev/null || true
fi
if [ "$started_sshd" = 1 ]; then
  bash scripts/sshd-local.sh stop >/dev/null || true
fi
exit "$rc"
