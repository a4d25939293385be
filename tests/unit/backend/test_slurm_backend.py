"""SlurmBackend and its preflight (before `scepsy up` submits) against FakeSlurm: submission (through FakeSlurm's
submitter, and through submitit itself with a stand-in sbatch), state from sacct then squeue, retries that never end in a
silent UNKNOWN, cancel, arrays, partitions, the commands counted."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scepsy_hpc.backend import agent
from scepsy_hpc.backend.base import CALLS_KEPT, NodeJob, normalise_state
from scepsy_hpc.backend.fake import FakeSlurm
from scepsy_hpc.backend.slurm import PartitionInfo, SlurmBackend, _agent_entry, _command_entry
from scepsy_hpc.backend.templates import submission_script, submitit_folder
from scepsy_hpc.errors import InfeasibleError, SlurmError, SpecError
from scepsy_hpc.spec.placement_entry import PlacementEntry

PY = "/opt/venv/bin/python"


class Sleeps:
    """An injected sleep that records the waits instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def _job(tmp_path: Path, nodes: tuple[str, ...] = ("node1", "node2"), **kw: Any) -> NodeJob:
    session = tmp_path / "sessions" / "demo"
    base: dict[str, Any] = dict(name="scepsy-demo", command=(PY, "-m", "scepsy_hpc.backend.agent", "--session", str(session)),
                                nodes=nodes, gpus_per_node=4, log_dir=session / "logs", workdir=tmp_path)
    return NodeJob(**{**base, **kw})


def _backend(fake: FakeSlurm, retries: int = 3) -> tuple[SlurmBackend, Sleeps]:
    sleeps = Sleeps()
    return SlurmBackend(run=fake, submitter=fake.submitter, retries=retries, retry_wait_s=0.5, sleep=sleeps), sleeps


def _array(fake: FakeSlurm, tmp_path: Path, spec: str = "0-3") -> str:
    """Submit an array job straight to the fake (NodeJob has no arrays); its id."""
    script = tmp_path / "array.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --job-name=arr\n#SBATCH --array={spec}\n#SBATCH --gres=gpu:1\nhostname\n")
    return fake(["sbatch", "--parsable", str(script)]).strip()


# -- submit ---------------------------------------------------------------------------------------------


def test_submit_keeps_submitit_s_script_beside_the_logs_and_returns_the_id(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend, _ = _backend(fake)
    job = _job(tmp_path, partition="gpu")
    first, second = backend.submit(job), backend.submit(job)
    script = backend.script_path(job)
    assert (first, second) == ("1", "2")
    assert script.parent == job.log_dir and script.is_symlink()
    assert script.resolve() == job.log_dir / "submitit" / "2" / "2_submission.sh"
    assert script.read_text() == submission_script(job)
    assert [c[:2] for c in fake.submitted()] == [["sbatch", "--parsable"]] * 2
    assert fake.jobs[1].options["nodelist"] == "node1,node2"
    assert fake.jobs[1].options["gres"] == "gpu:4"
    assert (fake.jobs[1].name, fake.jobs[1].options["comment"]) == ("scepsy-demo", "scepsy:scepsy-demo")
    assert [w for _, w in backend.calls] == ["sbatch", "sbatch"]


def test_a_job_with_a_session_runs_the_node_agent_else_its_command(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend, _ = _backend(fake)
    session = tmp_path / "sessions" / "demo"
    with_session = backend.submit(_job(tmp_path, session=session))
    without = backend.submit(_job(tmp_path))
    assert fake.jobs[int(with_session)].entry == (_agent_entry, str(session))
    assert fake.jobs[int(without)].entry == (_command_entry, _job(tmp_path).command)


def test_submit_takes_the_id_before_the_cluster_name(tmp_path: Path) -> None:
    backend, _ = _backend(FakeSlurm(cluster="hpc1"))
    assert backend.submit(_job(tmp_path)) == "1"


def test_submit_refuses_an_answer_that_is_no_job_id(tmp_path: Path) -> None:
    backend = SlurmBackend(run=FakeSlurm(), submitter=lambda *args: "Submitted batch job")
    with pytest.raises(SlurmError) as err:
        backend.submit(_job(tmp_path))
    assert "'Submitted batch job'" in str(err.value)
    assert "job id was expected" in str(err.value)


@pytest.mark.parametrize("kw, slurm_says", [
    (dict(partition="nope"), "Invalid partition name specified"),
    (dict(nodes=tuple(f"node{i}" for i in range(1, 6))), "Requested node configuration is not available"),
    (dict(gpus_per_node=8), "Requested node configuration is not available"),
    (dict(gres_type="a100"), "Invalid generic resource (gres) specification"),
])
def test_a_submission_sbatch_refuses_carries_sbatch_s_reason(tmp_path: Path, kw: dict, slurm_says: str) -> None:
    fake = FakeSlurm()
    backend, _ = _backend(fake)
    with pytest.raises(SlurmError) as err:
        backend.submit(_job(tmp_path, **kw))
    assert slurm_says in str(err.value)
    assert "sbatch --parsable" in str(err.value)
    assert fake.jobs == {}


# -- submit through submitit itself (a stand-in sbatch and srun on PATH) ---------------------------------


def _stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sbatch: str, srun: bool = True) -> Path:
    """`sbatch` (and `srun`, which submitit looks for) as scripts first on PATH; sbatch copies what it gets to seen.sh."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {"sbatch": f"#!/bin/bash\ncp \"$1\" {tmp_path}/seen.sh\n{sbatch}\n"}
    if srun:
        tools["srun"] = "#!/bin/bash\nexit 0\n"
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    # without srun, nothing else is on PATH either (the real srun may be in /usr/bin)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}" if srun else str(bin_dir))
    return tmp_path / "seen.sh"


def test_submitit_submits_the_agent_with_the_script_we_render(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _stand_ins(tmp_path, monkeypatch, "echo 'Submitted batch job 4242'")
    backend = SlurmBackend(run=FakeSlurm())
    job = _job(tmp_path, session=tmp_path / "sessions" / "demo", time="1:00:00")
    assert backend.submit(job) == "4242"
    folder = job.log_dir / "submitit" / "4242"
    assert seen.read_text() == submission_script(job) == (folder / "4242_submission.sh").read_text()
    assert backend.script_path(job).resolve() == folder / "4242_submission.sh"
    with open(folder / "4242_submitted.pkl", "rb") as f:
        delayed = pickle.load(f)
    assert (delayed.function, delayed.args) == (_agent_entry, (str(job.session),))
    assert [w for _, w in backend.calls] == ["sbatch"]


def test_a_refusal_through_submitit_is_a_slurm_error_with_sbatch_s_words(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_ins(tmp_path, monkeypatch, "echo 'sbatch: error: Batch job submission failed: Invalid account' >&2; exit 1")
    with pytest.raises(SlurmError) as err:
        SlurmBackend().submit(_job(tmp_path, account="nope"))
    assert "sbatch refused job scepsy-demo" in str(err.value)
    assert "Batch job submission failed: Invalid account" in str(err.value)


def test_submitit_without_srun_here_is_a_slurm_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_ins(tmp_path, monkeypatch, "exit 0", srun=False)
    with pytest.raises(SlurmError) as err:
        SlurmBackend().submit(_job(tmp_path))
    assert "srun" in str(err.value)


def test_reattach_finds_each_node_s_logs(tmp_path: Path) -> None:
    folder = submitit_folder(tmp_path / "logs")
    job = SlurmBackend().reattach("77", folder, nodes=2)
    assert job.job_id == "77"
    assert [job.task(i).paths.stdout for i in range(2)] == [tmp_path / "logs" / "submitit" / "77" / f"77_{i}_log.out"
                                                           for i in range(2)]
    assert job.paths.submission_file == tmp_path / "logs" / "submitit" / "77" / "77_submission.sh"


# -- what runs on the nodes -----------------------------------------------------------------------------


@pytest.mark.parametrize("rc", [0, 3])
def test_the_agent_entry_passes_the_session_and_fails_the_task_on_a_non_zero_code(rc: int,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(agent, "job_main", lambda session: seen.append(session) or rc, raising=False)
    if rc:
        with pytest.raises(SystemExit) as stop:
            _agent_entry("/s/demo")
        assert stop.value.code == rc
    else:
        assert _agent_entry("/s/demo") == 0
    assert seen == ["/s/demo"]


def test_the_command_entry_becomes_the_command_with_its_exit_code() -> None:
    code = "from scepsy_hpc.backend.slurm import _command_entry; _command_entry(['sh', '-c', 'echo on; exit 7'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert (done.returncode, done.stdout) == (7, "on\n")
    with pytest.raises(SlurmError) as err:
        _command_entry(["/no/such/agent", "--session", "x"])
    assert "'/no/such/agent'" in str(err.value)


# -- status ---------------------------------------------------------------------------------------------


def test_status_follows_the_job_from_pending_to_completed(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend, sleeps = _backend(fake)
    job_id = backend.submit(_job(tmp_path))
    pending = backend.status(job_id)
    fake.start(job_id)
    running = backend.status(job_id)
    fake.finish(job_id)
    done = backend.status(job_id)
    assert (pending.state, pending.nodes, pending.reason, pending.source) == ("PENDING", "", "Resources", "sacct")
    assert pending.active and not pending.running
    assert (running.state, running.nodes, running.reason) == ("RUNNING", "node[1-2]", "")
    assert running.running
    assert (done.state, done.exit_code, done.active) == ("COMPLETED", "0:0", False)
    assert sleeps.waits == []


def test_a_failed_job_reports_its_exit_code(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend, _ = _backend(fake)
    job_id = backend.submit(_job(tmp_path))
    fake.start(job_id)
    fake.finish(job_id, state="FAILED", exit_code="1:0")
    status = backend.status(job_id)
    assert (status.state, status.exit_code, status.nodes, status.active) == ("FAILED", "1:0", "node[1-2]", False)


def test_while_accounting_lags_state_comes_from_squeue(tmp_path: Path) -> None:
    fake = FakeSlurm(accounting_lag=1)
    backend, sleeps = _backend(fake)
    job_id = backend.submit(_job(tmp_path))
    fake.start(job_id)
    early, later = backend.status(job_id), backend.status(job_id)
    assert (early.state, early.nodes, early.source) == ("RUNNING", "node[1-2]", "squeue")
    assert (later.state, later.source) == ("RUNNING", "sacct")
    assert sleeps.waits == []


def test_without_accounting_state_comes_from_squeue(tmp_path: Path) -> None:
    fake = FakeSlurm(accounting_enabled=False)
    backend, _ = _backend(fake)
    job_id = backend.submit(_job(tmp_path))
    status = backend.status(job_id)
    assert (status.state, status.reason, status.source) == ("PENDING", "Resources", "squeue")


def test_a_job_neither_knows_is_an_error_after_the_retries_never_unknown(tmp_path: Path) -> None:
    backend, sleeps = _backend(FakeSlurm(), retries=3)
    with pytest.raises(SlurmError) as err:
        backend.status("4242")
    msg = str(err.value)
    assert "job 4242" in msg
    assert "after 4 tries" in msg
    assert "sacct does not list it" in msg
    assert "squeue" in msg and "Invalid job id specified" in msg
    assert sleeps.waits == [0.5, 1.0, 1.5]


def test_a_finished_job_without_accounting_is_an_error_once_squeue_drops_it(tmp_path: Path) -> None:
    fake = FakeSlurm(accounting_enabled=False)
    backend, sleeps = _backend(fake, retries=2)
    job_id = backend.submit(_job(tmp_path))
    fake.start(job_id)
    fake.finish(job_id)
    with pytest.raises(SlurmError) as err:
        backend.status(job_id)
    assert "accounting storage is disabled" in str(err.value)
    assert "squeue does not list it" in str(err.value)
    assert len(sleeps.waits) == 2


def test_retries_ride_out_accounting_lag_for_a_job_squeue_forgot(tmp_path: Path) -> None:
    fake = FakeSlurm(accounting_lag=2)
    backend, sleeps = _backend(fake, retries=5)
    job_id = backend.submit(_job(tmp_path))
    fake.start(job_id)
    fake.finish(job_id)
    fake.forget(job_id)
    status = backend.status(job_id)
    assert (status.state, status.source) == ("COMPLETED", "sacct")
    assert len(sleeps.waits) == 2


# -- cancel, in_queue -----------------------------------------------------------------------------------


def test_cancel_of_a_running_job_reports_cancelled_and_who(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend, _ = _backend(fake)
    job_id = backend.submit(_job(tmp_path))
    fake.start(job_id)
    backend.cancel(job_id)
    status = backend.status(job_id)
    assert (status.state, status.reason, status.exit_code) == ("CANCELLED", "CANCELLED by 0", "0:15")
    assert ["scancel", job_id] in fake.calls


def test_cancel_of_a_finished_job_is_no_error_and_changes_nothing(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend, _ = _backend(fake)
    job_id = backend.submit(_job(tmp_path))
    fake.start(job_id)
    fake.finish(job_id)
    backend.cancel(job_id)
    assert backend.status(job_id).state == "COMPLETED"


def test_in_queue_while_pending_or_running_only(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend, _ = _backend(fake)
    job_id = backend.submit(_job(tmp_path))
    seen = [backend.in_queue(job_id)]
    fake.start(job_id)
    seen.append(backend.in_queue(job_id))
    fake.finish(job_id, state="COMPLETING")
    seen.append(backend.in_queue(job_id))
    fake.finish(job_id)
    seen.append(backend.in_queue(job_id))
    fake.forget(job_id)
    seen.append(backend.in_queue(job_id))
    assert seen == [True, True, True, False, False]


# -- arrays ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accounting", [True, False])
def test_tasks_expand_the_pending_range_to_one_entry_per_task(tmp_path: Path, accounting: bool) -> None:
    fake = FakeSlurm(accounting_enabled=accounting)
    backend, _ = _backend(fake)
    job_id = _array(fake, tmp_path, "0-3%2")
    before = backend.tasks(job_id)
    fake.start(job_id, task=0, nodes=["node3"])
    fake.start(job_id, task=1)
    fake.finish(job_id, task=1)
    after = backend.tasks(job_id)
    assert {k: s.state for k, s in before.items()} == {f"{job_id}_{i}": "PENDING" for i in range(4)}
    want = {f"{job_id}_0": "RUNNING", f"{job_id}_2": "PENDING", f"{job_id}_3": "PENDING"}
    if accounting:   # squeue lists active tasks only; sacct also the finished one
        want[f"{job_id}_1"] = "COMPLETED"
    assert {k: s.state for k, s in after.items()} == want
    assert after[f"{job_id}_0"].nodes == "node3"


def test_array_status_is_active_while_any_task_is_then_the_worst_end(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend, _ = _backend(fake)
    ok, bad = _array(fake, tmp_path, "0-1"), _array(fake, tmp_path, "0-2")
    fake.start(ok)
    fake.finish(ok, task=0)
    one_left = backend.status(ok)
    fake.finish(ok, task=1)
    all_done = backend.status(ok)
    fake.start(bad)
    fake.finish(bad, task=0)
    fake.finish(bad, task=1, state="FAILED", exit_code="2:0")
    fake.finish(bad, task=2)
    failed = backend.status(bad)
    assert (one_left.job_id, one_left.state, one_left.active) == (ok, "RUNNING", True)
    assert (all_done.state, all_done.active) == ("COMPLETED", False)
    assert (failed.job_id, failed.state, failed.exit_code) == (bad, "FAILED", "2:0")


# -- partitions, states ---------------------------------------------------------------------------------


def test_partitions_marks_the_default() -> None:
    fake = FakeSlurm(partitions={"gpu": ["node1", "node2", "node3", "node4"], "debug": ["node9"]}, default_partition="debug")
    backend, _ = _backend(fake)
    assert backend.partitions() == {"gpu": PartitionInfo("gpu", False, True, 4), "debug": PartitionInfo("debug", True, True, 1)}


@pytest.mark.parametrize("text, state", [
    ("CANCELLED by 0", "CANCELLED"), ("CANCELLED by 1234", "CANCELLED"), ("RUNNING+", "RUNNING"),
    (" completed ", "COMPLETED"), ("OUT_OF_MEMORY", "OUT_OF_MEMORY"), ("", "UNKNOWN"), ("WEIRD", "WEIRD"),
])
def test_normalise_state(text: str, state: str) -> None:
    assert normalise_state(text) == state


def test_the_fake_refuses_a_command_line_it_does_not_model() -> None:
    fake = FakeSlurm()
    with pytest.raises(SlurmError) as err:
        fake(["squeue", "-u", "me"])
    assert "fake Slurm does not know `squeue -u me`" in str(err.value)
    assert fake.calls == [["squeue", "-u", "me"]]


def test_every_slurm_command_is_counted_with_its_word(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend, _ = _backend(fake)
    job_id = backend.submit(_job(tmp_path))
    backend.status(job_id)
    backend.cancel(job_id)
    backend.preflight("gpu", [_entry("node1", [0])])
    words = [w for _, w in backend.calls]
    assert words[:3] == ["sbatch", "sacct", "scancel"]
    assert words[3:] and set(words[3:]) <= {"sinfo", "scontrol"}
    assert len(words) == len(fake.calls)
    assert backend.calls_in(60) == len(words)
    assert backend.calls.maxlen == CALLS_KEPT


# -- preflight ------------------------------------------------------------------------------------------


def _entry(node: str, gpus: list[int], replica: int = 0) -> PlacementEntry:
    return PlacementEntry(llm="gen", replica=replica, node=node, gpus=gpus, gpu_frac=1.0, mem_frac=0.9, mps_pct=100,
                          port=8100 + replica)


def test_preflight_passes_a_placement_that_fits_and_submits_nothing() -> None:
    fake = FakeSlurm()
    backend, _ = _backend(fake)
    assert backend.preflight("gpu", [_entry("node1", [0, 1]), _entry("node2", [0, 1, 2, 3], 1)]) == "gpu"
    assert fake.submitted() == []


def test_preflight_names_an_unknown_partition_and_the_ones_there() -> None:
    fake = FakeSlurm(partitions={"gpu": ["node1"], "debug": ["node2"]})
    backend, _ = _backend(fake)
    with pytest.raises(SlurmError) as err:
        backend.preflight("gpu-big", [_entry("node1", [0])])
    msg = str(err.value)
    assert "'gpu-big'" in msg and "debug, gpu" in msg
    assert "nothing was submitted" in msg
    assert fake.submitted() == []


def test_preflight_refuses_more_gpus_than_the_partition_has() -> None:
    fake = FakeSlurm()
    backend, _ = _backend(fake)
    placement = [_entry(f"node{i}", [0, 1, 2, 3], i) for i in range(1, 6)]
    with pytest.raises(InfeasibleError) as err:
        backend.preflight("gpu", placement)
    assert "needs 20 GPUs" in str(err.value) and "has 16 (4 node(s))" in str(err.value)
    assert fake.submitted() == []


def test_preflight_refuses_a_node_outside_the_partition() -> None:
    backend, _ = _backend(FakeSlurm(partitions={"gpu": ["node1", "node2"], "cpu": ["node9"]}))
    with pytest.raises(SpecError) as err:
        backend.preflight("gpu", [_entry("node1", [0]), _entry("node9", [0], 1)])
    assert "node 'node9'" in str(err.value) and "partition 'gpu'" in str(err.value)
    assert "node1, node2" in str(err.value)


def test_preflight_refuses_a_gpu_index_beyond_the_node() -> None:
    backend, _ = _backend(FakeSlurm(gpus_per_node=4))
    with pytest.raises(SpecError) as err:
        backend.preflight("gpu", [_entry("node1", [3, 4])])
    assert "GPU 4 of node 'node1', which has 4 GPU(s)" in str(err.value)


def test_preflight_refuses_a_drained_node() -> None:
    backend, _ = _backend(FakeSlurm(node_states={"node2": "IDLE+DRAIN"}))
    assert backend.preflight("gpu", [_entry("node1", [0])]) == "gpu"
    with pytest.raises(SlurmError) as err:
        backend.preflight("gpu", [_entry("node1", [0]), _entry("node2", [0], 1)])
    assert "node 'node2' is idle+drain" in str(err.value)


def test_preflight_uses_the_default_partition_when_none_is_given() -> None:
    fake = FakeSlurm(partitions={"gpu": ["node1"], "big": ["node1", "node2"]}, default_partition="big")
    backend, _ = _backend(fake)
    assert backend.preflight(None, [_entry("node2", [0])]) == "big"


def test_preflight_without_partition_and_without_default_says_how_to_choose() -> None:
    backend, _ = _backend(FakeSlurm(default_partition=None))
    with pytest.raises(SlurmError) as err:
        backend.preflight(None, [_entry("node1", [0])])
    assert "no default partition" in str(err.value) and "--partition" in str(err.value)
