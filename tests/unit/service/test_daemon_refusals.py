"""Bad input to the daemon costs a clear error and loses nothing: a stale socket, a state database from a
newer scepsy or a damaged one, a socket or state dir of another user, a peer of another uid."""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_stale_socket_is_named_and_the_next_start_replaces_it(state: Path, sv: Any) -> None:
    state.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(state / "daemon.sock"))
    s.close()   # the file stays: what a daemon killed with -9 leaves
    done = sv.scepsy(state, "ls")
    assert done.returncode == 1
    assert "no scepsy daemon answers" in done.stderr and "stale socket" in done.stderr and "scepsy daemon start" in done.stderr
    started = sv.scepsy(state, "daemon", "start")
    assert started.returncode == 0, started.stderr
    assert sv.scepsy(state, "ls").returncode == 0


@pytest.mark.parametrize("make, said", [
    (lambda p: sqlite3.connect(p).execute("PRAGMA user_version = 99").connection.commit(), "newer scepsy"),
    (lambda p: p.write_bytes(b"this is not sqlite at all" * 100), "not a readable scepsy state database"),
])
def test_a_state_database_it_cannot_use_is_refused_untouched(state: Path, sv: Any, make: Any, said: str) -> None:
    state.mkdir(mode=0o700)
    db = state / "state.db"
    make(db)
    before = _sha(db)
    done = sv.scepsy(state, "daemon", "start")
    assert done.returncode == 1
    assert str(db) in done.stderr and said in done.stderr, done.stderr
    assert _sha(db) == before
    assert not (state / "daemon.sock").exists()


@ROOT_ONLY
def test_a_socket_of_another_user_is_refused_before_any_word_is_sent(state: Path, sv: Any) -> None:
    state.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(state / "daemon.sock"))
    s.listen(1)
    try:
        os.chown(state / "daemon.sock", 65534, 65534)
        done = sv.scepsy(state, "status")
        assert done.returncode == 1
        assert "belongs to uid 65534, not to you" in done.stderr and "--state-dir" in done.stderr
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):
            s.accept()   # the client never connected
    finally:
        s.close()


@ROOT_ONLY
def test_a_state_dir_of_another_user_is_refused(tmp_path: Path, sv: Any) -> None:
    state = tmp_path / "theirs"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    done = sv.scepsy(state, "daemon", "start")
    assert done.returncode == 1 and "belongs to uid 65534, not to you" in done.stderr


@ROOT_ONLY
def test_a_peer_of_another_uid_is_refused_by_the_api(sv: Any) -> None:
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="scepsy-peer-", dir="/tmp"))   # a path another user can walk down
    state = top / "state"
    try:
        _refused_peer(sv, top, state)
    finally:
        sv.scepsy(state, "daemon", "stop", "--all")
        shutil.rmtree(top, ignore_errors=True)


def _refused_peer(sv: Any, top: Path, state: Path) -> None:
    assert sv.scepsy(state, "daemon", "start").returncode == 0
    sock = state / "daemon.sock"
    os.chmod(sock, 0o666)          # even if the socket's mode were lost, the peer's uid is checked
    os.chmod(state, 0o711)
    os.chmod(top, 0o711)
    probe = ("import os, socket; os.setgid(65534); os.setuid(65534); s = socket.socket(socket.AF_UNIX); "
             f"s.connect({str(sock)!r}); s.sendall(b'GET /v1/deployments HTTP/1.0\\r\\n\\r\\n'); "
             "print(s.recv(200).decode().splitlines()[0])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    os.chmod(state, 0o700)
    assert "403" in done.stdout, done.stdout + done.stderr


def test_a_job_submitted_just_before_the_daemon_died_is_found_by_its_name_not_orphaned(tmp_path: Path, state: Path,
                                                                                       sv: Any) -> None:
    """The state says a submission was under way (the job's name, with its nonce) but holds no job id."""
    import time

    from scepsy_hpc.backend.base import NodeJob
    from scepsy_hpc.backend.local import LocalBackend
    from scepsy_hpc.service.state import Deployment, StateStore

    state.mkdir(mode=0o700)
    session = state / "deployments" / "lost"
    part = session / "jobs" / "scepsy-lost-n1-abc123"
    backend = LocalBackend(state / ".local-jobs")
    job_id = backend.submit(NodeJob(name="scepsy-lost-n1-abc123", command=("sleep", "300"), nodes=("n1",),
                                    gpus_per_node=1, log_dir=part / "logs", workdir=tmp_path))
    with StateStore(state / "state.db") as store:
        store.add_deployment(Deployment(name="lost", state="pending", session_dir=str(session),
                                        options={"backend": "local", "pending_jobs": {"scepsy-lost-n1-abc123": {
                                            "unit": "n1", "replaces": "", "session_dir": str(part), "node": "n1"}}}))
    assert sv.scepsy(state, "daemon", "start", "--poll", "0.5").returncode == 0
    doc = sv.wait_state(state, "lost", ("starting", "failed", "stopping", "stopped"), check=lambda d: d["job_id"])
    assert doc["job_id"] == job_id
    assert f"adopted job {job_id} (scepsy-lost-n1-abc123)" in sv.scepsy(state, "events", "lost").stdout
    down = sv.scepsy(state, "down", "lost")   # adopted, so `down` reaches it: nothing is left running
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 20
    while backend.status(job_id).active and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not backend.status(job_id).active
