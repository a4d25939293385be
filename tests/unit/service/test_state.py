"""The daemon's state database: rows round-trip and outlive the process (even `kill -9`), other processes
read while it writes, transactions are all or nothing, and a file it cannot use is refused untouched."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from scepsy_hpc.errors import ScepsyError
from scepsy_hpc.service.state import (MAX_EVENTS, MAX_MESSAGE_CHARS, SCHEMA_VERSION, Deployment, InstanceRow, Job,
                                      StateError, StateStore)

ROOT = Path(__file__).resolve().parents[3]


def _deployment(name: str = "demo", **fields: Any) -> Deployment:
    return Deployment(**{"name": name, "target": "slurm", "plan_path": "/p/plan.yaml",
                         "spec_paths": ["/p/wf.yaml", "/p/cat.yaml"], "options": {"poll_s": 5.0, "gpus": [0, 1]},
                         "session_dir": f"/s/{name}", **fields})


def _job(job_id: str = "101", deployment: str = "demo", **fields: Any) -> Job:
    return Job(**{"job_id": job_id, "deployment": deployment, "backend": "slurm", "name": f"scepsy-{deployment}-a1b2",
                  "submit_time": "2026-01-02T03:04:05", "walltime_end": 1.5e9, "nodes": "gpu[01-02]",
                  "folder": "/s/logs", "state": "RUNNING", **fields})


def _instance(llm: str = "gen", replica: int = 0, deployment: str = "demo", **fields: Any) -> InstanceRow:
    return InstanceRow(**{"deployment": deployment, "llm": llm, "replica": replica, "node": "gpu01", "gpus": [0, 1],
                          "url": "http://gpu01:8101", "state": "healthy", "healthy": True, "pid": 4242, **fields})


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _python(code: str, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, text=True,
                            stdin=stdin, stdout=subprocess.PIPE)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore(tmp_path / "state" / "state.db")
    yield s
    s.close()


def test_a_new_store_is_a_private_file_in_a_private_directory_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "state.db"
    with StateStore(path) as s:
        s.add_event(None, "daemon", "started")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert modes == {"state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600}   # the log is as private
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_an_empty_file_is_migrated_to_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.touch()
    with StateStore(path) as s:
        assert s.deployments() == [] and s.last_event_seq() == 0
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert {"meta", "deployments", "jobs", "instances", "events"} <= tables


def test_every_row_kind_round_trips_and_outlives_the_store(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with StateStore(path) as s:
        s.set_meta("gateway_port", "8080")
        d = s.add_deployment(_deployment())
        job = s.add_job(_job())
        s.set_instances("demo", [_instance("gen", 1), _instance("gen", 0), _instance("embed", 0, healthy=False)])
        ev = s.add_event("demo", "submitted", "job 101 submitted", {"job_id": "101", "nodes": ["gpu01"]})
        instances = s.instances()
    assert d.created > 0 and d.updated >= d.created
    with StateStore(path) as s:
        assert s.get_meta("gateway_port") == "8080" and s.get_meta("absent", "x") == "x"
        assert s.get_deployment("demo") == d and s.deployments() == [d]
        assert d.spec_paths == ["/p/wf.yaml", "/p/cat.yaml"] and d.options == {"poll_s": 5.0, "gpus": [0, 1]}
        assert s.jobs() == [job] and job.walltime_end == 1.5e9 and job.ended is None
        assert s.instances() == instances
        assert [(r.llm, r.replica, r.healthy) for r in instances] == [("embed", 0, False), ("gen", 0, True),
                                                                       ("gen", 1, True)]
        assert instances[1].gpus == [0, 1] and instances[1].pid == 4242
        assert s.events() == [ev] and ev.data == {"job_id": "101", "nodes": ["gpu01"]}


def test_updates_change_the_named_fields_and_stamp_updated(store: StateStore) -> None:
    d = store.add_deployment(_deployment(created=100.0))
    assert d.created == 100.0
    after = store.update_deployment("demo", state="serving", error="", options={"poll_s": 2.0})
    assert (after.state, after.options, after.created) == ("serving", {"poll_s": 2.0}, 100.0)
    assert after.updated > d.updated and store.get_deployment("demo") == after
    store.add_job(_job("101"))
    store.add_job(_job("102"))
    ended = store.update_job("slurm", "102", state="COMPLETED", exit_code="0:0", ended=2e9)
    assert ended.state == "COMPLETED" and ended.ended == 2e9
    assert [j.job_id for j in store.jobs("demo")] == ["101", "102"]
    assert [j.job_id for j in store.jobs(live_only=True)] == ["101"]
    store.set_instances("demo", [_instance()])
    row = store.update_instance("demo", "gen", 0, healthy=False, restarts=1, error="health: timeout")
    assert (row.healthy, row.restarts, row.error) == (False, 1, "health: timeout")
    assert store.instances("demo") == [row]


def test_updates_refuse_unknown_fields_keys_values_and_rows(store: StateStore) -> None:
    store.add_deployment(_deployment())
    with pytest.raises(TypeError) as unknown:
        store.update_deployment("demo", colour="red")
    with pytest.raises(TypeError) as key:
        store.update_deployment("demo", name="other")
    with pytest.raises(ValueError) as value:
        store.update_deployment("demo", state="runing")
    with pytest.raises(StateError) as missing:
        store.update_deployment("ghost", state="serving")
    with pytest.raises(StateError) as missing_job:
        store.update_job("slurm", "999", state="RUNNING")
    assert "colour" in str(unknown.value) and "name" in str(key.value) and "runing" in str(value.value)
    assert "'ghost'" in str(missing.value) and "999" in str(missing_job.value)
    assert store.get_deployment("demo") == store.deployments()[0] and store.deployments()[0].state == "pending"


def test_adding_a_taken_name_or_a_job_of_no_deployment_is_refused(store: StateStore) -> None:
    store.add_deployment(_deployment())
    with pytest.raises(StateError) as taken:
        store.add_deployment(_deployment())
    with pytest.raises(StateError) as orphan:
        store.add_job(_job(deployment="ghost"))
    store.add_job(_job())
    with pytest.raises(StateError) as twice:
        store.add_job(_job())
    with pytest.raises(StateError) as orphans:
        store.set_instances("ghost", [_instance(deployment="ghost")])
    assert "'demo' already exists" in str(taken.value) and str(store.path) in str(taken.value)
    assert "no deployment 'ghost'" in str(orphan.value) and "no deployment 'ghost'" in str(orphans.value)
    assert "101" in str(twice.value) and isinstance(twice.value, ScepsyError) and twice.value.exit_code == 1
    assert len(store.jobs()) == 1 and store.instances() == []


def test_deployments_come_oldest_first_and_stopped_ones_can_be_left_out(store: StateStore) -> None:
    store.add_deployment(_deployment("b", created=2.0, state="stopped", desired="stopped"))
    store.add_deployment(_deployment("a", created=3.0, state="serving"))
    store.add_deployment(_deployment("c", created=1.0, state="failed"))
    assert [d.name for d in store.deployments()] == ["c", "b", "a"]
    assert [d.name for d in store.deployments(include_stopped=False)] == ["c", "a"]


def test_set_instances_replaces_the_deployments_instances_only(store: StateStore) -> None:
    store.add_deployment(_deployment("a"))
    store.add_deployment(_deployment("b"))
    store.set_instances("a", [_instance("gen", 0, "a"), _instance("gen", 1, "a")])
    store.set_instances("b", [_instance("gen", 0, "b")])
    store.set_instances("a", [_instance("judge", 0, "a")])
    assert [(r.deployment, r.llm, r.replica) for r in store.instances()] == [("a", "judge", 0), ("b", "gen", 0)]
    with pytest.raises(ValueError):
        store.set_instances("a", [_instance("gen", 0, "b")])
    assert len(store.instances("a")) == 1


def test_events_come_in_order_after_a_seq_per_deployment_capped_and_cut(store: StateStore) -> None:
    for i in range(5):
        store.add_event("a" if i % 2 == 0 else None, "tick", f"m{i}")
    assert [e.message for e in store.events()] == ["m0", "m1", "m2", "m3", "m4"]
    assert [e.seq for e in store.events()] == [1, 2, 3, 4, 5] and store.last_event_seq() == 5
    assert [e.message for e in store.events(after=3)] == ["m3", "m4"]
    assert [e.message for e in store.events("a", after=1)] == ["m2", "m4"]
    assert [e.message for e in store.events(limit=2)] == ["m0", "m1"]
    long = store.add_event(None, "error", "x" * (MAX_MESSAGE_CHARS + 10))
    assert len(long.message) == MAX_MESSAGE_CHARS and long.message.endswith("x…")
    assert store.events(after=5)[0].message == long.message
    with store.transaction():
        for i in range(MAX_EVENTS):
            store.add_event(None, "tick", str(i))
    assert len(store.events(limit=MAX_EVENTS * 2)) == MAX_EVENTS


def test_a_failed_transaction_leaves_nothing_nested_ones_included(store: StateStore) -> None:
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.add_deployment(_deployment())
            with store.transaction():
                store.add_job(_job())
                store.add_event("demo", "submitted", "job 101")
            raise RuntimeError("crash before commit")
    with pytest.raises(StateError):
        with store.transaction():
            store.add_deployment(_deployment("ok"))
            store.add_job(_job(deployment="ghost"))
    assert store.deployments() == [] and store.jobs() == [] and store.events() == []
    with store.transaction():
        store.add_deployment(_deployment())
        with store.transaction():
            store.add_job(_job())
    assert len(store.deployments()) == 1 and len(store.jobs()) == 1   # the store still works


def test_deleting_a_deployment_takes_its_jobs_and_instances_but_not_its_events(store: StateStore) -> None:
    for name in ("a", "b"):
        store.add_deployment(_deployment(name))
        store.add_job(_job(f"{name}1", name))
        store.set_instances(name, [_instance(deployment=name)])
        store.add_event(name, "up", f"{name} up")
    assert store.delete_deployment("a") and not store.delete_deployment("a")
    assert [d.name for d in store.deployments()] == ["b"]
    assert [j.deployment for j in store.jobs()] == ["b"] and [r.deployment for r in store.instances()] == ["b"]
    assert [e.message for e in store.events()] == ["a up", "b up"]


def test_threads_share_one_store(store: StateStore) -> None:
    def write(n: int) -> None:
        for i in range(50):
            store.add_event(None, "tick", f"{n}.{i}")
    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = store.events()
    assert len(events) == 200 and [e.seq for e in events] == list(range(1, 201))
    for n in range(4):
        assert [e.message for e in events if e.message.startswith(f"{n}.")] == [f"{n}.{i}" for i in range(50)]


def test_another_process_reads_while_this_one_writes(store: StateStore) -> None:
    store.add_deployment(_deployment("a"))
    child = _python("""
        import sys
        from scepsy_hpc.service.state import StateStore
        s = StateStore(sys.argv[1])
        print(",".join(d.name for d in s.deployments()), flush=True)
        sys.stdin.readline()
        s.add_event(None, "child", "hello")
        print(",".join(d.name for d in s.deployments()), flush=True)
    """, str(store.path), stdin=subprocess.PIPE)
    assert child.stdin and child.stdout
    try:
        with store.transaction():
            store.add_deployment(_deployment("b"))
            for _ in range(1000):   # 4 MB: past SQLite's page cache, so the write reaches the file before COMMIT
                store.add_event("b", "bulk", "x" * 4000)
            seen_during = child.stdout.readline().strip()   # without WAL the child would wait for the COMMIT
        child.stdin.write("go\n")
        child.stdin.flush()
        seen_after = child.stdout.readline().strip()
        assert child.wait(timeout=10) == 0
    finally:
        child.kill()
    assert seen_during == "a" and seen_after == "a,b"
    assert [e.message for e in store.events(after=1000)] == ["hello"]


def test_a_writer_killed_mid_loop_leaves_a_database_holding_a_prefix(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    writer = _python("""
        import sys
        from scepsy_hpc.service.state import StateStore
        s = StateStore(sys.argv[1])
        i = 0
        while True:
            with s.transaction():            # a pair is written whole or not at all
                s.add_event(None, "tick", f"{i}a")
                s.add_event(None, "tick", f"{i}b")
            i += 1
            if i == 200:
                print("ready", flush=True)
    """, str(path))
    assert writer.stdout
    try:
        assert writer.stdout.readline().strip() == "ready"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
    assert writer.returncode == -signal.SIGKILL
    with StateStore(path) as s:
        messages = [e.message for e in s.events(limit=MAX_EVENTS)]
    pairs = len(messages) // 2
    assert pairs >= 200 and len(messages) % 2 == 0
    assert messages == [f"{i}{half}" for i in range(pairs) for half in "ab"]


def _newer(path: Path) -> None:
    StateStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()


def _garbage(path: Path) -> None:
    path.write_bytes(b"SQLite format 2\x00" + bytes(range(256)) * 40)


def _truncated(path: Path) -> None:
    with StateStore(path) as s:
        s.add_deployment(_deployment())
        with s.transaction():
            for i in range(300):
                s.add_event("demo", "tick", "m" * 400)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _no_deployments_table(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


def _someone_elses(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, blob BLOB)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(("make", "says"), [
    (_newer, f"written by a newer scepsy (schema {SCHEMA_VERSION + 1}, this one reads ≤ {SCHEMA_VERSION}): "
             "upgrade scepsy, or point --state-dir elsewhere"),
    (_garbage, "is not a readable scepsy state database (file is not a database)"),
    (_truncated, "is not a readable scepsy state database"),
    (_no_deployments_table, "does not hold the tables of scepsy state schema 1 (missing: deployments, "),
    (_someone_elses, "does not hold the tables of scepsy state schema 0 (unexpected: photos)"),
], ids=["newer", "garbage", "truncated", "other-tables", "foreign"])
def test_a_file_it_cannot_use_is_refused_and_left_untouched(tmp_path: Path, make: Callable[[Path], None],
                                                            says: str) -> None:
    path = tmp_path / "state.db"
    make(path)
    before = _sha(path), sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(StateError) as refused:
        StateStore(path)
    assert (_sha(path), sorted(p.name for p in tmp_path.iterdir())) == before
    message = str(refused.value)
    assert message.startswith(str(path)) and says in message
    if make is not _newer:
        assert f"`mv {path} {path}.bad`" in message and message.endswith("nothing was changed")


def test_pruning_keeps_the_newest_events_and_their_numbers(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state.db") as store:
        for i in range(10):
            store.add_event(None, "k", f"m{i}")
        assert store.prune_events(3) == 7
        assert [e.message for e in store.events()] == ["m7", "m8", "m9"]
        assert store.add_event(None, "k", "m10").seq == 11   # numbers never repeat
        assert store.prune_events(100) == 0


def test_a_schema_1_file_migrates_to_2_keeping_its_deployments_jobs_and_events(tmp_path: Path) -> None:
    from scepsy_hpc.service.state import MIGRATIONS

    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)   # a state database as issue 19's daemon left it
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO deployments VALUES ('old', 'serving', 'serving', 'slurm', '/p.yaml', '[]', '{}', '/s', '',"
                 " 1.0, 1.0)")
    conn.execute("INSERT INTO jobs VALUES ('7', 'old', 'slurm', 'scepsy-old-abc123', 'serve', '2026-12-06T01:50:00', 9e9,"
                 " 'node[1-2]', '/s/logs', 'RUNNING', '', '', 1.0, 1.0, NULL)")
    conn.execute("INSERT INTO instances VALUES ('old', 'gen', 0, 'node1', '[0]', 'http://h:1', 'healthy', 1, 5, 0, '',"
                 " 1.0)")
    conn.execute("INSERT INTO events (ts, deployment, kind, message, data) VALUES (1.0, 'old', 'up', 'x', '{}')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with StateStore(path) as s:
        (job,) = s.jobs("old")
        assert (job.job_id, job.nodes, job.session_dir, job.unit, job.replaces, job.drain_started) == \
            ("7", "node[1-2]", "", "", "", None)   # "" session dir: the deployment's own (one job for all nodes)
        assert s.instances("old") == []   # derived from the agents' reports again on the next cycle
        assert [e.kind for e in s.events("old")] == ["up"] and s.get_deployment("old").state == "serving"
        s.set_instances("old", [InstanceRow(deployment="old", llm="gen", replica=0, job_id="7", routed=True),
                                InstanceRow(deployment="old", llm="gen", replica=0, job_id="8")])   # one per job
        assert [(r.job_id, r.routed) for r in s.instances("old")] == [("7", True), ("8", False)]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    conn.close()


def test_a_schema_2_file_migrates_to_3_keeping_its_rows_and_gaining_keys_and_engine_secrets(tmp_path: Path) -> None:
    from scepsy_hpc.service.state import MIGRATIONS, KeyRow

    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)   # a state database as issue 20's daemon left it
    for migration in MIGRATIONS[:2]:
        for statement in migration:
            conn.execute(statement)
    conn.execute("INSERT INTO deployments VALUES ('old', 'serving', 'serving', 'local', '/p.yaml', '[]', '{}', '/s', '',"
                 " 1.0, 1.0)")
    conn.execute("INSERT INTO jobs (job_id, deployment, backend, name, role, submit_time, walltime_end, nodes, folder,"
                 " state, reason, exit_code, created, updated, ended, session_dir, unit) VALUES ('7', 'old', 'local',"
                 " 'scepsy-old-n1-abc123', 'serve', '', NULL, 'n1', '/s/logs', 'RUNNING', '', '', 1.0, 1.0, NULL,"
                 " '/s/jobs/x', 'n1')")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with StateStore(path) as s:
        (job,) = s.jobs("old")
        assert (job.job_id, job.unit, job.engine_secret) == ("7", "n1", "")   # an older job: no secret known
        assert "engine_secret" not in repr(job)                                # never printed by accident
        s.update_job("local", "7", engine_secret="s3cret")
        assert s.jobs("old")[0].engine_secret == "s3cret"
        assert s.keys() == []
        row = s.add_key(KeyRow(id="0a1b2c3d", deployment="old", sha256="ab" * 32, label="ci", rpm=60))
        assert row.created > 0 and "abab" not in repr(row)
        with pytest.raises(StateError):
            s.add_key(KeyRow(id="0a1b2c3d", deployment="old", sha256="cd" * 32))
        revoked = s.revoke_key("0a1b2c3d", when=5.0)
        assert revoked.revoked_at == 5.0 and s.keys(include_revoked=False) == []
        assert s.delete_deployment("old") and s.get_key("0a1b2c3d") is not None   # keys outlive their deployment
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    conn.close()
