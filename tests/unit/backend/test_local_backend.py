"""LocalBackend: a job is a process group here; its state survives the process that started it, a
cancel stops the whole group; the seam's partitions and preflight describe this machine."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from scepsy_hpc.backend.base import NodeJob, PartitionInfo
from scepsy_hpc.backend.local import LocalBackend
from scepsy_hpc.errors import SlurmError, SpecError
from scepsy_hpc.spec.placement_entry import PlacementEntry


def _job(tmp_path: Path, command: tuple[str, ...]) -> NodeJob:
    return NodeJob(name="scepsy-t", command=command, nodes=("n1", "n2"), gpus_per_node=1, log_dir=tmp_path / "logs",
                   workdir=tmp_path)


def _wait_final(backend: LocalBackend, job_id: str, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = backend.status(job_id)
        if not st.active:
            return st.state
        time.sleep(0.05)
    raise AssertionError(f"{job_id} still {st.state}")


def test_a_job_runs_once_per_node_and_completes(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "jobs")
    job_id = backend.submit(_job(tmp_path, ("bash", "-c", "echo on $SLURMD_NODENAME")))
    assert job_id.startswith("local-")
    assert _wait_final(backend, job_id) == "COMPLETED"
    assert (tmp_path / "logs" / "agent-n1.out").read_text() == "on n1\n"
    assert (tmp_path / "logs" / "agent-n2.out").read_text() == "on n2\n"
    assert not backend.in_queue(job_id)


def test_cancel_stops_the_group_and_cancel_and_wait_sees_it_leave(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "jobs")
    job_id = backend.submit(_job(tmp_path, ("sleep", "60")))
    assert backend.in_queue(job_id) and backend.status(job_id).state == "RUNNING"
    t0 = time.monotonic()
    assert backend.cancel_and_wait(job_id, timeout_s=20.0)
    assert time.monotonic() - t0 < 15
    st = backend.status(job_id)
    assert st.state == "CANCELLED" and "cancelled by scepsy" in st.reason
    backend.cancel(job_id)   # cancelling a finished job is no error


def test_an_unknown_job_is_an_error_naming_where_records_are(tmp_path: Path) -> None:
    with pytest.raises(SlurmError) as err:
        LocalBackend(tmp_path / "jobs").status("local-1")
    assert "local-1" in str(err.value) and str(tmp_path / "jobs") in str(err.value)


def test_partitions_describe_this_machine_and_preflight_checks_the_local_run(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "jobs")
    assert backend.partitions() == {"local": PartitionInfo("local", True, True, 1)}
    entry = PlacementEntry(llm="gen", replica=0, node="n1", gpus=[0])
    assert backend.preflight(None, [entry]) is None
    assert backend.preflight("gpu", [entry]) == "gpu"   # a cluster spec's partition is not used here
    with pytest.raises(SpecError):
        backend.preflight(None, [])


def _pids_running(pattern: str) -> list[int]:
    import subprocess

    done = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


def test_a_walltime_ends_the_job_as_timeout_with_its_end_known_while_it_runs(tmp_path: Path) -> None:
    import dataclasses
    import datetime as dt

    backend = LocalBackend(tmp_path / "jobs")
    marker = f"sleep 3{time.monotonic_ns() % 1000:03d}"   # a command line no other test runs
    job = dataclasses.replace(_job(tmp_path, ("bash", "-c", marker)), time="0:02")
    job_id = backend.submit(job)
    st = backend.status(job_id)
    assert st.state == "RUNNING"
    end = dt.datetime.fromisoformat(st.end).timestamp()
    assert 0.5 < end - time.time() <= 2.5
    assert _wait_final(backend, job_id, timeout_s=10) == "TIMEOUT"
    assert "walltime" in backend.status(job_id).reason
    time.sleep(0.3)
    assert _pids_running(marker) == []   # the whole job ended, not only the shell that waited for it


def test_cancel_stops_every_process_of_a_job_with_a_walltime(tmp_path: Path) -> None:
    import dataclasses

    backend = LocalBackend(tmp_path / "jobs")
    marker = f"sleep 4{time.monotonic_ns() % 1000:03d}"
    job_id = backend.submit(dataclasses.replace(_job(tmp_path, ("bash", "-c", marker)), time="10:00"))
    deadline = time.monotonic() + 5
    while not _pids_running(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pids_running(marker)
    assert backend.cancel_and_wait(job_id, timeout_s=20)
    time.sleep(0.3)
    assert backend.status(job_id).state == "CANCELLED" and _pids_running(marker) == []


def test_nodes_of_a_given_shape_count_the_gpus_running_jobs_hold(tmp_path: Path) -> None:
    import dataclasses

    backend = LocalBackend(tmp_path / "jobs", nodes={"n1": 4, "n2": 4})
    assert LocalBackend(tmp_path / "other").nodes(None) is None   # without a shape a node is only a label
    job_id = backend.submit(dataclasses.replace(_job(tmp_path, ("sleep", "30")), gpus_per_node=3))
    try:
        got = {n.name: (n.gpus, n.gpus_alloc, n.usable) for n in backend.nodes(None)}
        assert got == {"n1": (4, 3, True), "n2": (4, 3, True)}
        backend.node_states["n2"] = "drained"
        assert [n.name for n in backend.nodes(None) if not n.usable] == ["n2"]
    finally:
        backend.cancel(job_id, grace_s=2.0)
    assert {n.gpus_alloc for n in backend.nodes(None)} == {0}
