"""The process supervisor with real subprocesses: health waits that notice an early exit, TERM then
KILL after the grace, the whole process group stopped and the leader reaped."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from scepsy_hpc.engine.supervisor import (free_port, group_alive, pid_alive, port_free, start, stop_all, stop_group,
                                          wait_healthy)
from scepsy_hpc.errors import EngineError

PY = sys.executable


def _zombie_or_gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(") ", 1)[1][0] == "Z"


def test_early_exit_during_the_health_wait_is_an_engine_error_with_the_log_tail(tmp_path: Path) -> None:
    code = "import sys; print('loading weights'); print('CUDA out of memory', flush=True); sys.exit(3)"
    proc = start([PY, "-c", code], tmp_path / "engine.log", what="engine gen·0", health=lambda: False)
    with pytest.raises(EngineError) as err:
        wait_healthy([proc], timeout_s=30.0)
    msg = str(err.value)
    assert "engine gen·0 exited with code 3 while starting" in msg
    assert f"see {tmp_path / 'engine.log'}" in msg and "CUDA out of memory" in msg
    assert proc.returncode == 3 and not Path(f"/proc/{proc.pid}").exists()   # reaped


def test_not_healthy_by_the_deadline_is_an_engine_error(tmp_path: Path) -> None:
    proc = start([PY, "-c", "import time; print('still loading', flush=True); time.sleep(60)"], tmp_path / "e.log",
                 what="engine slow", health=lambda: False)
    try:
        t0 = time.monotonic()
        with pytest.raises(EngineError) as err:
            wait_healthy([proc], timeout_s=0.5)
        assert time.monotonic() - t0 < 10
    finally:
        proc.stop(grace_s=2.0)
    assert "engine slow not healthy after 0.5 s" in str(err.value)


def test_a_health_url_is_probed_until_it_answers(tmp_path: Path) -> None:
    port = free_port()
    code = (f"import http.server, time; time.sleep(0.3); "
            f"h = type('H', (http.server.BaseHTTPRequestHandler,), {{'do_GET': lambda s: (s.send_response(200), s.end_headers()),"
            f" 'log_message': lambda *a: None}}); http.server.HTTPServer(('127.0.0.1', {port}), h).serve_forever()")
    proc = start([PY, "-c", code], tmp_path / "srv.log", what="server", health=f"http://127.0.0.1:{port}")
    try:
        wait_healthy([proc], timeout_s=30.0)
        assert proc.poll() is None and not port_free(port, "127.0.0.1")
    finally:
        proc.stop(grace_s=2.0)
    assert proc.returncode is not None


def test_a_child_that_ignores_term_is_killed_after_the_grace_and_its_group_is_reaped(tmp_path: Path) -> None:
    # the leader ignores TERM and so does a grandchild it started (same process group)
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "c = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print(1, flush=True); time.sleep(60)']); print(c.pid, flush=True); time.sleep(60)")
    proc = start([PY, "-c", code], tmp_path / "stubborn.log", what="stubborn")
    deadline = time.monotonic() + 20
    while len(proc.log_path.read_text().split()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(proc.log_path.read_text().split()[0])
    assert os.getpgid(grandchild) == proc.pid   # its own group, shared with what it starts
    t0 = time.monotonic()
    code_ = proc.stop(grace_s=0.5)
    took = time.monotonic() - t0
    assert code_ == -9 and 0.5 <= took < 10
    assert not Path(f"/proc/{proc.pid}").exists(), "the leader is reaped, not left a zombie"
    assert _zombie_or_gone(grandchild) and not group_alive(proc.pid)


def test_a_polite_child_stops_on_term_without_waiting_for_the_grace(tmp_path: Path) -> None:
    procs = [start([PY, "-c", "import time; time.sleep(60)"], tmp_path / f"p{i}.log", what=f"p{i}") for i in range(3)]
    t0 = time.monotonic()
    stop_all(procs, grace_s=30.0)
    assert time.monotonic() - t0 < 10
    assert all(p.returncode == -15 for p in procs)
    assert all(not Path(f"/proc/{p.pid}").exists() for p in procs)


def test_stop_group_stops_a_group_it_did_not_start(tmp_path: Path) -> None:
    proc = start(["bash", "-c", "sleep 60 & sleep 60; wait"], tmp_path / "job.log", what="job")
    assert group_alive(proc.pid) and pid_alive(proc.pid)
    stop_group(proc.pid, grace_s=5.0)
    assert not group_alive(proc.pid)
    assert not pid_alive(proc.pid)


def test_a_command_that_does_not_exist_is_an_engine_error_with_the_hint(tmp_path: Path) -> None:
    with pytest.raises(EngineError) as err:
        start(["/nonexistent/vllm", "serve"], tmp_path / "x.log", what="vllm for gen", missing_hint="install vllm")
    host = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    assert f"vllm for gen: `/nonexistent/vllm` is not installed on {host}: install vllm" in str(err.value)


def test_a_command_that_cannot_be_executed_says_why(tmp_path: Path) -> None:
    script = tmp_path / "engine.sh"
    script.write_text("#!/bin/sh\necho hi\n")  # not executable
    with pytest.raises(EngineError) as err:
        start([str(script)], tmp_path / "x.log", what="sim engine")
    assert f"sim engine: cannot run `{script}` (Permission denied)" in str(err.value)
