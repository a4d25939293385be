"""Processes that die with their parent (PR_SET_PDEATHSIG), and the /proc helpers that tell whose a process
group is: real processes, Linux only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scepsy_hpc.engine.supervisor import (_die_with, group_alive, group_members, pid_alive, process_environ, start,
                                          stop_groups)

PY = sys.executable
ROOT = str(Path(__file__).resolve().parents[3])

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")


def _wait(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _middle(tmp_path: Path, die_with_parent: bool, then: str) -> tuple[int, subprocess.CompletedProcess[str]]:
    """A process that starts `sleep` through the supervisor, prints its pid, then does `then`; (sleep's pid, it)."""
    code = ("import os, sys, time; from scepsy_hpc.engine.supervisor import start; "
            f"p = start(['sleep', '60'], sys.argv[1], what='sleeper', die_with_parent={die_with_parent}); "
            f"print(p.pid, flush=True); {then}")
    done = subprocess.run([PY, "-c", code, str(tmp_path / "sleep.log")], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": ROOT})
    return int(done.stdout.split()[0]), done


def test_a_child_started_to_die_with_its_parent_dies_when_the_parent_is_killed(tmp_path: Path) -> None:
    pid, done = _middle(tmp_path, True, "time.sleep(0.3); os.kill(os.getpid(), 9)")
    assert done.returncode == -9
    assert _wait(lambda: not group_alive(pid), 3.0), "the sleeper outlived its parent's kill -9"


def test_without_it_the_child_outlives_its_parent(tmp_path: Path) -> None:
    pid, done = _middle(tmp_path, False, "time.sleep(0.3); os.kill(os.getpid(), 9)")
    try:
        assert done.returncode == -9
        time.sleep(0.5)
        assert group_alive(pid)   # the case `reap_engines` is for
    finally:
        stop_groups([pid], grace_s=2.0)
    assert not group_alive(pid)


def test_a_parent_that_dies_at_once_takes_the_child_along(tmp_path: Path) -> None:
    # the parent exits right after the fork returns: whether prctl ran before (the signal) or after (the
    # parent check), the child must not survive
    pid, done = _middle(tmp_path, True, "os._exit(0)")
    assert done.returncode == 0
    assert _wait(lambda: not group_alive(pid), 3.0)


def test_a_child_whose_parent_died_before_prctl_kills_itself_before_exec(tmp_path: Path) -> None:
    # the race made deterministic: the child is told that its parent is a process that is not its parent,
    # as a child re-parented after its parent's death would find
    proc = subprocess.Popen([PY, "-c", "print('ran', flush=True)"], stdout=subprocess.PIPE,
                            preexec_fn=_die_with(os.getpid() + 999_999))
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL and out == b""   # killed before the command ran
    ok = subprocess.Popen([PY, "-c", "print('ran', flush=True)"], stdout=subprocess.PIPE,
                          preexec_fn=_die_with(os.getpid()))
    assert ok.communicate(timeout=10)[0] == b"ran\n" and ok.returncode == 0


def test_a_missing_command_is_still_an_engine_error_with_die_with_parent(tmp_path: Path) -> None:
    from scepsy_hpc.errors import EngineError

    with pytest.raises(EngineError) as err:
        start(["/nonexistent/vllm"], tmp_path / "x.log", what="vllm", die_with_parent=True)
    assert "`/nonexistent/vllm` is not installed" in str(err.value)


def test_group_members_and_environ_see_a_group_that_outlived_its_leader(tmp_path: Path) -> None:
    proc = start(["bash", "-c", "sleep 60 & echo $!; exec sleep 60"], tmp_path / "g.log", what="group",
                 env={**os.environ, "SCEPSY_TEST_MARK": "m-1"})
    try:
        assert _wait(lambda: proc.log_path.read_text().strip() != "")
        child = int(proc.log_path.read_text().split()[0])
        assert _wait(lambda: sorted(group_members([proc.pid])[proc.pid]) == sorted([proc.pid, child]))
        assert process_environ(child)["SCEPSY_TEST_MARK"] == "m-1"
        os.kill(proc.pid, signal.SIGKILL)
        proc.popen.wait()
        assert not pid_alive(proc.pid) and group_alive(proc.pid)
        assert group_members([proc.pid, 1]) == {proc.pid: [child], 1: []}
    finally:
        stop_groups([proc.pid], grace_s=2.0)
    assert not group_alive(proc.pid) and process_environ(child) == {}


def test_stop_groups_stops_all_at_once_and_kills_the_stubborn_after_one_grace(tmp_path: Path) -> None:
    polite = start(["sleep", "60"], tmp_path / "p.log", what="p")
    stubborn = [start([PY, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "print('up', flush=True); time.sleep(60)"], tmp_path / f"s{i}.log", what=f"s{i}")
                for i in range(3)]
    assert _wait(lambda: all("up" in s.log_path.read_text() for s in stubborn), 10.0)
    t0 = time.monotonic()
    stop_groups([polite.pid] + [s.pid for s in stubborn], grace_s=1.0)
    took = time.monotonic() - t0
    assert 1.0 <= took < 2.5   # one grace for all, not one each (3 s)
    assert not any(group_alive(p.pid) for p in [polite, *stubborn])
