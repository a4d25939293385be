"""The serving job through submitit on the real local Slurm: what squeue shows of it, `poll` adopting it and seeing it
leave through sacct, the script submitit wrote being the one we render, and the node agent's entry starting on the nodes.

The cluster is scripts/slurm-local.sh's (node1..4, 4 fake H100s each, partition gpu).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest

from scepsy_hpc.backend.base import JobRef, JobStatus, NodeJob, owned
from scepsy_hpc.backend.slurm import SlurmBackend
from scepsy_hpc.backend.templates import submission_script, submitit_folder

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def _until(fetch: Callable[[], T], done: Callable[[T], bool], timeout_s: float) -> T:
    """fetch() until done(value) or the timeout; the last value either way, for the caller to assert on."""
    deadline = time.monotonic() + timeout_s
    value = fetch()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.3)
        value = fetch()
    return value


def _job(tmp_path: Path, name: str, **kw: object) -> NodeJob:
    base: dict[str, object] = dict(
        name=name, nodes=("node1", "node2"), gpus_per_node=1, gres_type="h100", partition="gpu", time="5",
        log_dir=tmp_path / "logs", workdir=tmp_path, env={"PYTHONPATH": str(ROOT), "SCEPSY_T": "it's here"},
        # each node writes where it runs, in which directory, with which environment, then waits to be cancelled
        command=("sh", "-c", 'echo "$SLURMD_NODENAME|$PWD|$SCEPSY_T|$CUDA_VISIBLE_DEVICES" > "seen-$SLURMD_NODENAME"; '
                             "exec sleep 120"))
    return NodeJob(**{**base, **kw})  # type: ignore[arg-type]


def test_a_submitit_job_is_adopted_by_poll_and_seen_leaving_through_sacct(tmp_path: Path) -> None:
    backend = SlurmBackend()
    job = _job(tmp_path, "scepsy-it-poll")
    job_id = backend.submit(job)
    try:
        ref = JobRef(job_id, job.name)
        running = _until(lambda: backend.poll([ref]).get(job_id), lambda st: st is not None and st.running, 30)
        assert running is not None and (running.state, running.source) == ("RUNNING", "squeue")
        assert owned(ref, running) and running.nodes == "node[1-2]" and running.submit
        queue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%j|%D|%N|%b|%k"], capture_output=True, text=True,
                               check=True).stdout.strip()
        assert queue.split("|")[:3] == ["scepsy-it-poll", "2", "node[1-2]"]
        assert "gpu:h100:1" in queue and queue.endswith("|scepsy:scepsy-it-poll")

        # each node ran the command in the workdir, with the job's environment and its GPU
        seen = _until(lambda: sorted(p.name for p in tmp_path.glob("seen-*")), lambda s: len(s) == 2, 20)
        assert seen == ["seen-node1", "seen-node2"]
        for node in ("node1", "node2"):
            name, cwd, env, gpus = (tmp_path / f"seen-{node}").read_text().strip().split("|")
            assert (name, cwd, env, len(gpus.split(","))) == (node, str(tmp_path), "it's here", 1)

        # what submitit wrote is what we render (its python is this one)
        assert backend.script_path(job).read_text() == submission_script(job, python=sys.executable)

        ref = JobRef(job_id, job.name, running.submit)
        backend.cancel(job_id)
        gone: JobStatus | None = _until(lambda: backend.poll([ref]).get(job_id),
                                        lambda st: st is not None and st.source == "sacct", 30)
        assert gone is not None and (gone.state, gone.source) == ("CANCELLED", "sacct")
        assert owned(ref, gone) and gone.reason.startswith("CANCELLED by") and gone.end
        words = [w for _, w in backend.calls]
        assert words.count("sbatch") == 1 and words.count("scancel") == 1
        assert words.count("sacct") <= words.count("squeue")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


def test_a_session_job_starts_the_agent_entry_on_every_node(tmp_path: Path) -> None:
    # the session is empty: the agent (or, before it exists, its import) fails once started, which is all this needs
    backend = SlurmBackend()
    session = tmp_path / "sessions" / "empty"
    session.mkdir(parents=True)
    job = _job(tmp_path, "scepsy-it-agent", session=session, log_dir=session / "logs")
    job_id = backend.submit(job)
    try:
        ref = JobRef(job_id, job.name)
        end = _until(lambda: backend.poll([ref]).get(job_id), lambda st: st is not None and not st.active, 40)
        assert end is not None and end.state == "FAILED", end
        handle = backend.reattach(job_id, submitit_folder(job.log_dir), nodes=2)
        for i in range(2):   # submitit's task runner started on each node and loaded our entry
            out = handle.task(i).paths.stdout.read_text()
            assert f"node={i}(2)" in out and "Loading pickle" in out, out
        assert not list(tmp_path.glob("seen-*"))   # the command is not what runs when there is a session
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
