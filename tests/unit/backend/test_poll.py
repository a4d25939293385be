"""Polling many jobs at once: one squeue per poll whatever the number of jobs, one sacct for those that left the queue,
recycled job ids told apart by name and submit time (`owned`), and the local backend answering from its records."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest

from scepsy_hpc.backend.base import JobRef, JobStatus, NodeJob, owned
from scepsy_hpc.backend.fake import FakeSlurm
from scepsy_hpc.backend.local import LocalBackend
from scepsy_hpc.backend.slurm import SlurmBackend
from scepsy_hpc.errors import SlurmError

NOW = dt.datetime(2026, 12, 6, 12, 0, 0)


def _backend(fake: FakeSlurm) -> SlurmBackend:
    return SlurmBackend(run=fake, submitter=fake.submitter, now=lambda: NOW)


def _submit(backend: SlurmBackend, tmp_path: Path, n: int) -> list[JobRef]:
    refs = []
    for i in range(n):
        name = f"scepsy-d{i}"
        job = NodeJob(name=name, command=("true",), nodes=("node1",), gpus_per_node=1, log_dir=tmp_path / name / "logs",
                      workdir=tmp_path)
        refs.append(JobRef(backend.submit(job), name))
    return refs


def _words(fake: FakeSlurm, since: int = 0) -> list[str]:
    return [c[0] for c in fake.calls[since:]]


@pytest.mark.parametrize("n", [1, 5, 20])
def test_queued_jobs_cost_one_squeue_and_no_sacct_whatever_their_number(tmp_path: Path, n: int) -> None:
    fake = FakeSlurm()
    backend = _backend(fake)
    refs = _submit(backend, tmp_path, n)
    fake.start(refs[0].job_id)
    before = len(fake.calls)
    got = backend.poll(refs)
    assert _words(fake, before) == ["squeue"]
    assert sorted(got) == sorted(r.job_id for r in refs)
    assert all(owned(r, got[r.job_id]) for r in refs)
    assert got[refs[0].job_id].state == "RUNNING" and got[refs[0].job_id].nodes == "node1"
    assert {got[r.job_id].state for r in refs[1:]} <= {"PENDING"}
    assert got[refs[-1].job_id].submit == fake.jobs[int(refs[-1].job_id)].submit != ""
    assert backend.calls_in(60) == n + 1   # n sbatch, one squeue


def test_no_refs_cost_no_command() -> None:
    fake = FakeSlurm()
    backend = _backend(fake)
    assert backend.poll([]) == {}
    assert fake.calls == [] and len(backend.calls) == 0


def test_jobs_that_left_the_queue_cost_one_sacct_in_all_from_the_oldest_submit(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend = _backend(fake)
    refs = _submit(backend, tmp_path, 6)
    first = backend.poll(refs)
    refs = [JobRef(r.job_id, r.name, first[r.job_id].submit) for r in refs]   # the submit times, once known
    fake.start(refs[1].job_id)
    fake.finish(refs[1].job_id)
    fake.start(refs[2].job_id)
    fake.finish(refs[2].job_id, state="FAILED", exit_code="1:0")
    fake.advance(30)
    backend.cancel(refs[3].job_id)
    fake.start(refs[5].job_id)
    before = len(fake.calls)
    got = backend.poll(refs)
    assert _words(fake, before) == ["squeue", "sacct"]
    assert fake.calls[-1][fake.calls[-1].index("-S") + 1] == refs[1].submit   # the oldest of those that left
    assert fake.calls[-1][:3] == ["sacct", "-u", fake.user]
    states = {r.job_id: (got[r.job_id].state, got[r.job_id].source) for r in refs}
    assert states == {refs[0].job_id: ("PENDING", "squeue"), refs[1].job_id: ("COMPLETED", "sacct"),
                      refs[2].job_id: ("FAILED", "sacct"), refs[3].job_id: ("CANCELLED", "sacct"),
                      refs[4].job_id: ("PENDING", "squeue"), refs[5].job_id: ("RUNNING", "squeue")}
    assert got[refs[2].job_id].exit_code == "1:0"
    assert got[refs[3].job_id].reason == "CANCELLED by 0"
    assert got[refs[1].job_id].end != "" and got[refs[3].job_id].end > got[refs[1].job_id].end
    assert all(owned(r, got[r.job_id]) for r in refs)


def test_without_known_submit_times_sacct_looks_back_a_week(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend = _backend(fake)
    (ref,) = _submit(backend, tmp_path, 1)
    fake.finish(ref.job_id, state="CANCELLED")
    got = backend.poll([ref])
    assert fake.calls[-1][fake.calls[-1].index("-S") + 1] == "2026-11-29T12:00:00"
    assert got[ref.job_id].state == "CANCELLED"


def test_a_job_neither_knows_is_absent_and_other_users_jobs_are_not_asked(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend = _backend(fake)
    (ref,) = _submit(backend, tmp_path, 1)
    fake.jobs[int(ref.job_id)].user = "someone-else"
    got = backend.poll([ref, JobRef("999", "scepsy-gone")])
    assert got == {}
    assert _words(fake)[-2:] == ["squeue", "sacct"]


def test_a_failing_squeue_is_an_error_and_a_failing_sacct_leaves_those_jobs_absent(tmp_path: Path) -> None:
    fake = FakeSlurm(accounting_enabled=False)
    backend = _backend(fake)
    refs = _submit(backend, tmp_path, 2)
    fake.finish(refs[0].job_id)
    got = backend.poll(refs)
    assert sorted(got) == [refs[1].job_id]   # sacct failed: the finished one is not known, not an error

    def broken(argv: list[str]) -> str:
        raise SlurmError("`squeue --me` failed (exit 1): slurm_load_jobs error: Unable to contact slurm controller")

    with pytest.raises(SlurmError) as err:
        SlurmBackend(run=broken).poll(refs)
    assert "Unable to contact slurm controller" in str(err.value)


# -- recycled ids ---------------------------------------------------------------------------------------


def test_an_id_slurm_gave_to_another_job_is_not_owned(tmp_path: Path) -> None:
    fake = FakeSlurm(accounting_enabled=False)   # only the new job is left to see
    backend = _backend(fake)
    (ref,) = _submit(backend, tmp_path, 1)
    fake.start(ref.job_id)
    fake.finish(ref.job_id)
    fake.recycle(ref.job_id, "someones-training")
    got = backend.poll([ref])[ref.job_id]
    assert (got.name, got.state) == ("someones-training", "PENDING")
    assert not owned(ref, got)


def test_a_recycled_id_under_the_same_name_is_told_apart_by_its_submit_time(tmp_path: Path) -> None:
    fake = FakeSlurm(accounting_enabled=False)
    backend = _backend(fake)
    (ref,) = _submit(backend, tmp_path, 1)
    ref = JobRef(ref.job_id, ref.name, backend.poll([ref])[ref.job_id].submit)
    fake.finish(ref.job_id, state="CANCELLED")
    fake.recycle(ref.job_id, ref.name)   # e.g. the same deployment submitted again after the controller's reset
    got = backend.poll([ref])[ref.job_id]
    assert got.name == ref.name and got.submit > ref.submit
    assert not owned(ref, got)
    assert owned(JobRef(ref.job_id, ref.name), got)   # without the submit time only the name could tell


def test_when_the_queue_shows_another_job_under_our_id_sacct_finds_ours(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend = _backend(fake)
    (ref,) = _submit(backend, tmp_path, 1)
    ref = JobRef(ref.job_id, ref.name, backend.poll([ref])[ref.job_id].submit)
    fake.start(ref.job_id)
    fake.finish(ref.job_id)
    fake.recycle(ref.job_id, "a|b")   # another job of ours, named with a '|' (squeue's separator)
    fake.start(ref.job_id)
    before = len(fake.calls)
    got = backend.poll([ref])
    assert _words(fake, before) == ["squeue", "sacct"]
    assert (got[ref.job_id].state, got[ref.job_id].source) == ("COMPLETED", "sacct")
    assert owned(ref, got[ref.job_id])
    # asked by both jobs' refs, the id answers with the one in the queue, without asking sacct
    before = len(fake.calls)
    other = backend.poll([ref, JobRef(ref.job_id, "a|b")])[ref.job_id]
    assert (other.name, other.state) == ("a|b", "RUNNING")
    assert _words(fake, before) == ["squeue"]


@pytest.mark.parametrize("status, is_ours", [
    (JobStatus("7", "RUNNING", name="scepsy-a", submit="2026-12-06T01:50:00"), True),
    (JobStatus("7", "RUNNING", name="scepsy-b", submit="2026-12-06T01:50:00"), False),
    (JobStatus("7", "RUNNING", name="scepsy-a", submit="2026-12-06T02:10:00"), False),
    (JobStatus("8", "RUNNING", name="scepsy-a", submit="2026-12-06T01:50:00"), False),
])
def test_owned_needs_the_same_id_name_and_submit_time(status: JobStatus, is_ours: bool) -> None:
    assert owned(JobRef("7", "scepsy-a", "2026-12-06T01:50:00"), status) is is_ours
    assert owned(JobRef("7", "scepsy-a"), status) is (status.job_id == "7" and status.name == "scepsy-a")


def test_the_fake_answers_squeue_for_a_named_user_as_for_me(tmp_path: Path) -> None:
    fake = FakeSlurm()
    _submit(_backend(fake), tmp_path, 3)
    fmt = "%i|%j|%T|%V|%N|%r|%e"
    mine = fake(["squeue", "--me", "-h", "-o", fmt])
    assert fake(["squeue", "-u", fake.user, "-h", "-o", fmt]) == mine
    assert len(mine.splitlines()) == 3
    assert fake(["squeue", "-u", "nobody-here", "-h", "-o", fmt]) == ""


# -- the commands counter -------------------------------------------------------------------------------


def test_calls_in_counts_only_the_window(tmp_path: Path) -> None:
    fake = FakeSlurm()
    backend = _backend(fake)
    backend.calls.append((time.monotonic() - 120, "squeue"))
    refs = _submit(backend, tmp_path, 2)
    backend.poll(refs)
    assert backend.calls_in(60) == 3 and backend.calls_in(600) == 4


# -- the local backend ----------------------------------------------------------------------------------


def test_local_poll_reads_the_records_and_runs_no_command(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "jobs")
    job = NodeJob(name="scepsy-l", command=("sleep", "30"), nodes=("n1",), gpus_per_node=0, log_dir=tmp_path / "logs",
                  workdir=tmp_path)
    job_id = backend.submit(job)
    try:
        assert [w for _, w in backend.calls] == ["bash"]
        got = backend.poll([JobRef(job_id, "scepsy-l"), JobRef("local-999999999", "x")])
        assert list(got) == [job_id]
        st = got[job_id]
        assert (st.state, st.name, st.source) == ("RUNNING", "scepsy-l", "local")
        assert abs(dt.datetime.fromisoformat(st.submit) - dt.datetime.now()) < dt.timedelta(seconds=30)
        assert owned(JobRef(job_id, "scepsy-l", st.submit), st)
        assert [w for _, w in backend.calls] == ["bash"]   # the poll ran nothing
    finally:
        backend.cancel(job_id, grace_s=2)
    done = backend.poll([JobRef(job_id, "scepsy-l")])[job_id]
    assert (done.state, done.submit) == ("CANCELLED", st.submit)


def test_local_poll_reads_a_record_written_before_submit_times_were_kept(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "scepsy-old.rc").write_text("0\n")
    (jobs / "local-999999999").write_text(f"{tmp_path / 'logs'}\nscepsy-old\nn1,n2\n")
    st = LocalBackend(jobs).poll([JobRef("local-999999999", "scepsy-old")])["local-999999999"]
    assert (st.state, st.nodes, st.name) == ("COMPLETED", "n1,n2", "scepsy-old")
    mtime = dt.datetime.fromtimestamp((jobs / "local-999999999").stat().st_mtime)
    assert st.submit == mtime.strftime("%Y-%m-%dT%H:%M:%S")
    assert st.end != ""
