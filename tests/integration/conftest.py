"""Integration fixtures: a live Slurm cluster (`sudo scripts/slurm-local.sh start`), or a skip without one.

With CI=true a missing cluster fails the tests instead: there the cluster is part of the job, and a skip
would hide that it never came up.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

_START = "start one with: sudo scripts/slurm-local.sh start"


def _cluster_problem() -> str | None:
    """Why no Slurm cluster answers here, or None when one does."""
    if shutil.which("sinfo") is None:
        return "`sinfo` is not on PATH"
    try:
        done = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except FileNotFoundError:
        return "`scontrol` is not on PATH"
    except subprocess.TimeoutExpired:
        return "`scontrol ping` did not answer within 15 s"
    if done.returncode != 0 or "is UP" not in done.stdout:
        # "Slurmctld(primary) at vm is DOWN", then a banner: the first line says it
        said = next((ln.strip() for ln in (done.stdout + done.stderr).splitlines() if ln.strip()),
                    f"exit {done.returncode}")
        return f"`scontrol ping` says: {said}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skip (fail when CI=true) unless a Slurm controller answers `scontrol ping`."""
    problem = _cluster_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but no Slurm cluster is up: {problem}; the CI job must {_START}", pytrace=False)
    pytest.skip(f"no Slurm cluster: {problem}; {_START}")
