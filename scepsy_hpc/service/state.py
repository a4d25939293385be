"""The daemon's durable state: one SQLite file, `<state dir>/state.db`, written before it is acted on.

    meta(key, value)                          daemon-wide settings (the gateway's port, …)
    deployments(name, desired, state, …)      what the user asked for and where it stands
    jobs(backend, job_id, deployment, …)      the jobs that serve a deployment, one per node of its plan and
                                              their replacements (id, name and submit time together
                                              identify one: Slurm recycles ids)
    instances(deployment, job_id, llm, …)     each engine, its health and whether the gateway routes to it
    events(seq, ts, deployment, kind, …)      append-only history; kept when a deployment is deleted
    keys(id, deployment, sha256, …)           client keys of the gateway: only their SHA-256 (service/keys.py);
                                              kept when a deployment is deleted, so `up` again keeps them

Every write commits before its method returns, so a transition is on disk before the daemon acts on
it; `transaction()` groups several writes into one. The file is in WAL mode with synchronous=NORMAL:
a committed write survives the daemon being killed (`kill -9`), readers in other processes never
wait for the writer, and only a power loss can take back the last commits. WAL needs shared memory
between the processes that open the file, so they must all run on one host (the daemon is one per
user per login node).

The schema version lives in `PRAGMA user_version`; `MIGRATIONS[i]` takes version i to i + 1, each in
one transaction. A file this code cannot use (a newer schema, not a database, damaged, other tables)
is refused with a `StateError` saying what to do, and is left byte for byte as it was.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Literal, get_args
from urllib.parse import quote

from scepsy_hpc.errors import ScepsyError

SCHEMA_VERSION = 3
DB_NAME = "state.db"
BUSY_TIMEOUT_MS = 5000
MAX_EVENTS = 10_000                  # the most rows one `events()` call returns
MAX_MESSAGE_CHARS = 4096             # an event message past this is cut, ending in "…"
# SQLite failures that come from the file system or another process, not from this code
_ENVIRONMENT_ERRORS = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_BUSY", "SQLITE_LOCKED",
                       "SQLITE_CANTOPEN", "SQLITE_PROTOCOL")

Desired = Literal["serving", "stopped"]
DeploymentState = Literal["pending", "starting", "serving", "degraded", "stopping", "stopped", "failed"]

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (   # 0 -> 1: the tables
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE deployments (name TEXT PRIMARY KEY, desired TEXT NOT NULL, state TEXT NOT NULL,"
        " target TEXT NOT NULL, plan_path TEXT NOT NULL, spec_paths TEXT NOT NULL, options TEXT NOT NULL,"
        " session_dir TEXT NOT NULL, error TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL)",
        "CREATE TABLE jobs (job_id TEXT NOT NULL,"
        " deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,"
        " backend TEXT NOT NULL, name TEXT NOT NULL, role TEXT NOT NULL, submit_time TEXT NOT NULL,"
        " walltime_end REAL, nodes TEXT NOT NULL, folder TEXT NOT NULL, state TEXT NOT NULL,"
        " reason TEXT NOT NULL, exit_code TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,"
        " ended REAL, PRIMARY KEY (backend, job_id))",
        "CREATE INDEX jobs_by_deployment ON jobs (deployment)",
        "CREATE TABLE instances (deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,"
        " llm TEXT NOT NULL, replica INTEGER NOT NULL, node TEXT NOT NULL, gpus TEXT NOT NULL,"
        " url TEXT NOT NULL, state TEXT NOT NULL, healthy INTEGER NOT NULL, pid INTEGER,"
        " restarts INTEGER NOT NULL, error TEXT NOT NULL, updated REAL NOT NULL,"
        " PRIMARY KEY (deployment, llm, replica))",
        # no foreign key: a deployment's history outlives it
        "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, deployment TEXT,"
        " kind TEXT NOT NULL, message TEXT NOT NULL, data TEXT NOT NULL)",
        "CREATE INDEX events_by_deployment ON events (deployment, seq)",
    ),
    (   # 1 -> 2: a deployment is served by several jobs (one per node of its plan, and their replacements);
        # instances are derived from the agents' reports every cycle, so their table is rebuilt empty
        "ALTER TABLE jobs ADD COLUMN session_dir TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE jobs ADD COLUMN unit TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE jobs ADD COLUMN replaces TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE jobs ADD COLUMN started REAL",
        "ALTER TABLE jobs ADD COLUMN drain_started REAL",
        "DROP TABLE instances",
        "CREATE TABLE instances (deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,"
        " llm TEXT NOT NULL, replica INTEGER NOT NULL, node TEXT NOT NULL, gpus TEXT NOT NULL,"
        " url TEXT NOT NULL, state TEXT NOT NULL, healthy INTEGER NOT NULL, pid INTEGER,"
        " restarts INTEGER NOT NULL, error TEXT NOT NULL, updated REAL NOT NULL, job_id TEXT NOT NULL,"
        " routed INTEGER NOT NULL, PRIMARY KEY (deployment, job_id, llm, replica))",
    ),
    (   # 2 -> 3: client keys (stored hashed), and each job's engine secret (its engines accept only calls carrying it)
        "CREATE TABLE keys (id TEXT PRIMARY KEY, deployment TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,"
        " label TEXT NOT NULL, created REAL NOT NULL, revoked_at REAL, max_concurrent INTEGER, rpm INTEGER)",
        "CREATE INDEX keys_by_deployment ON keys (deployment)",
        "ALTER TABLE jobs ADD COLUMN engine_secret TEXT NOT NULL DEFAULT ''",
    ),
)


class StateError(ScepsyError):
    """The state database cannot be used, or lacks the row asked for; the message names the file."""

    exit_code = 1


@dataclass(frozen=True)
class Deployment:
    """A named deployment: what the user asked for (`desired`) and where it stands (`state`)."""

    name: str
    desired: Desired = "serving"
    state: DeploymentState = "pending"
    target: str = ""                  # the backend it runs on ("local", "slurm")
    plan_path: str = ""
    spec_paths: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    session_dir: str = ""
    error: str = ""
    created: float = 0.0              # Unix seconds; 0 = stamped by `add_deployment`
    updated: float = 0.0


@dataclass(frozen=True)
class Job:
    """A cluster job that serves a deployment; (backend, job_id) is its key."""

    job_id: str
    deployment: str
    backend: str
    name: str                         # carries a nonce: a recycled job id with another name is not ours
    role: str = "serve"
    submit_time: str = ""             # as Slurm prints it; "" until known
    walltime_end: float | None = None
    nodes: str = ""
    folder: str = ""
    state: str = ""
    reason: str = ""
    exit_code: str = ""
    created: float = 0.0              # Unix seconds; 0 = stamped by `add_job`
    updated: float = 0.0
    ended: float | None = None        # None while the job is live
    session_dir: str = ""             # the job's own session directory (serve.json, agents/, logs/); "" = the deployment's
    unit: str = ""                    # the plan's node(s) this job serves (it may run them on other nodes)
    replaces: str = ""                # the job id this one replaces (a walltime cut-over, a re-placement)
    started: float | None = None      # Unix seconds the daemon first saw it run
    drain_started: float | None = None   # Unix seconds its engines were taken out of the gateway's routes
    engine_secret: str = field(default="", repr=False)   # its engines' secret ("" for jobs of an older scepsy)


@dataclass(frozen=True)
class InstanceRow:
    """One engine replica of a deployment and its last known health."""

    deployment: str
    llm: str
    replica: int
    node: str = ""
    gpus: list[int] = field(default_factory=list)
    url: str = ""
    state: str = ""
    healthy: bool = False
    pid: int | None = None
    restarts: int = 0
    error: str = ""
    updated: float = 0.0
    job_id: str = ""                  # the job whose agent runs it
    routed: bool = False              # the gateway sends it calls (healthy, and its job is not draining)


@dataclass(frozen=True)
class Event:
    """One line of history; `deployment` is None for the daemon's own events."""

    seq: int
    ts: float
    deployment: str | None
    kind: str
    message: str
    data: dict[str, Any]


@dataclass(frozen=True)
class KeyRow:
    """One client key of a deployment: never the key, only its SHA-256 (hex of the UTF-8 text)."""

    id: str                           # public: `sk-scepsy-<id>-…`, shown by `scepsy keys list` and in logs
    deployment: str
    sha256: str = field(repr=False)
    label: str = ""
    created: float = 0.0              # Unix seconds; 0 = stamped by `add_key`
    revoked_at: float | None = None   # None while the key works
    max_concurrent: int | None = None   # calls in flight at once (None: no limit)
    rpm: int | None = None            # requests per minute (None: no limit)


@dataclass(frozen=True, kw_only=True)
class _Table:
    """How one dataclass maps onto one table."""

    name: str
    row: type
    key: tuple[str, ...]
    order: str                                  # ORDER BY of every listing
    json_columns: frozenset[str] = frozenset()
    bool_columns: frozenset[str] = frozenset()
    fixed: frozenset[str] = frozenset()         # never changed by an update

    @property
    def columns(self) -> tuple[str, ...]:
        """The row's fields, which are the table's columns, in order."""
        return tuple(f.name for f in fields(self.row))

    def encode(self, values: dict[str, Any]) -> dict[str, Any]:
        """Python values as stored: JSON columns as text, bools as 0/1."""
        return {k: json.dumps(v) if k in self.json_columns else int(v) if isinstance(v, bool) else v
                for k, v in values.items()}

    def decode(self, row: tuple[Any, ...]) -> Any:
        """A stored row as its dataclass."""
        return self.row(**{k: json.loads(v) if k in self.json_columns else bool(v) if k in self.bool_columns else v
                           for k, v in zip(self.columns, row)})


_DEPLOYMENTS = _Table(name="deployments", row=Deployment, key=("name",), order="created, name",
                      json_columns=frozenset({"spec_paths", "options"}), fixed=frozenset({"name", "created", "updated"}))
_JOBS = _Table(name="jobs", row=Job, key=("backend", "job_id"), order="created, backend, job_id",
               fixed=frozenset({"backend", "job_id", "deployment", "created", "updated"}))
_INSTANCES = _Table(name="instances", row=InstanceRow, key=("deployment", "job_id", "llm", "replica"),
                    order="deployment, llm, replica, job_id", json_columns=frozenset({"gpus"}),
                    bool_columns=frozenset({"healthy", "routed"}),
                    fixed=frozenset({"deployment", "job_id", "llm", "replica", "updated"}))
_KEYS = _Table(name="keys", row=KeyRow, key=("id",), order="created, id")
_EVENTS = _Table(name="events", row=Event, key=("seq",), order="seq", json_columns=frozenset({"data"}))


def _check_deployment_values(values: dict[str, Any]) -> None:
    if "desired" in values and values["desired"] not in get_args(Desired):
        raise ValueError(f"desired={values['desired']!r}; expected one of {get_args(Desired)}")
    if "state" in values and values["state"] not in get_args(DeploymentState):
        raise ValueError(f"state={values['state']!r}; expected one of {get_args(DeploymentState)}")


def _schema(conn: sqlite3.Connection) -> dict[tuple[str, str], str]:
    """Every table and index the file holds, with its SQL (SQLite's own objects left out)."""
    rows = conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall()
    return {(kind, name): sql for kind, name, sql in rows}


def _expected_schema(version: int) -> dict[tuple[str, str], str]:
    """The tables and indexes that `MIGRATIONS` build up to `version`."""
    conn = sqlite3.connect(":memory:")
    try:
        for migration in MIGRATIONS[:version]:
            for statement in migration:
                conn.execute(statement)
        return _schema(conn)
    finally:
        conn.close()


class StateStore:
    """The daemon's state database, safe to call from several threads (one connection behind a lock)."""

    def __init__(self, path: str | Path) -> None:
        """Open `path`, creating it (0600, its directory 0700) if absent, and migrate it to `SCHEMA_VERSION`.

        A file that cannot be used is refused with a `StateError` before anything is written to it.
        """
        self.path = Path(path).absolute()
        self._lock = threading.RLock()
        self._depth = 0
        if not self.path.exists():
            self._create_file()
        try:
            self._conn = sqlite3.connect(f"file:{quote(str(self.path))}?mode=rw", uri=True, isolation_level=None,
                                         check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open {self.path} ({exc}): check that it is a file you may read "
                             "and write") from exc
        try:
            self._check()
            self._configure()
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _create_file(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            parent.mkdir(parents=True, mode=0o700)
            parent.chmod(0o700)           # mkdir's mode is narrowed by the umask, never widened
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))

    def _refuse(self, what: str) -> StateError:
        return StateError(f"{self.path} {what}: move it aside (`mv {self.path} {self.path}.bad`) and start "
                          "the daemon again; nothing was changed")

    def _check(self) -> None:
        """Refuse a file this code cannot use; only reads, so a refused file is left as it was."""
        try:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(f"{self.path} was written by a newer scepsy (schema {version}, this one reads "
                                 f"≤ {SCHEMA_VERSION}): upgrade scepsy, or point --state-dir elsewhere")
            problems = [r[0] for r in self._conn.execute("PRAGMA quick_check").fetchall()]
            schema = _schema(self._conn)
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                raise StateError(f"{self.path} stayed locked by another process for {BUSY_TIMEOUT_MS / 1000:g} s "
                                 "(is another daemon using this state directory?); try again") from exc
            raise self._refuse(f"is not a readable scepsy state database ({exc})") from exc
        if problems != ["ok"]:
            raise self._refuse(f"is not a readable scepsy state database (quick_check: {'; '.join(problems[:3])})")
        expected = _expected_schema(version)
        if schema != expected:
            missing = sorted(n for k, n in expected if (k, n) not in schema)
            unexpected = sorted(n for k, n in schema if (k, n) not in expected)
            different = sorted(n for k, n in expected if (k, n) in schema and schema[k, n] != expected[k, n])
            found = "; ".join(f"{label}: {', '.join(names)}" for label, names in
                              (("missing", missing), ("unexpected", unexpected), ("different", different)) if names)
            raise self._refuse(f"does not hold the tables of scepsy state schema {version} ({found})")

    def _configure(self) -> None:
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StateError(f"{self.path}: SQLite cannot use write-ahead logging there (journal mode stays "
                             f"{mode!r}): point --state-dir at a local file system")
        self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")

    def _migrate(self) -> None:
        while self._version() < SCHEMA_VERSION:
            with self.transaction():
                version = self._version()     # another process may have migrated since
                if version < SCHEMA_VERSION:
                    for statement in MIGRATIONS[version]:
                        self._conn.execute(statement)
                    self._conn.execute(f"PRAGMA user_version={version + 1}")

    def _version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        """Close the connection (checkpointing the log into the file); later calls fail."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Make the writes inside one commit (all or none); inside another transaction it adds nothing."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StateError(f"cannot write {self.path} ({exc}): is another daemon using this state "
                                 "directory?") from exc
            self._depth = 1
            try:
                yield
                self._conn.execute("COMMIT")
            except BaseException as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorname", "").startswith(
                        _ENVIRONMENT_ERRORS):
                    raise StateError(f"cannot write {self.path} ({exc}): check the disk and the file's "
                                     "permissions") from exc
                raise
            finally:
                self._depth = 0

    def _select(self, table: _Table, where: str = "", args: tuple[Any, ...] = (), tail: str = "") -> list[Any]:
        sql = f"SELECT {', '.join(table.columns)} FROM {table.name}"
        sql += f" WHERE {where}" if where else ""
        with self._lock:
            rows = self._conn.execute(f"{sql} ORDER BY {table.order}{tail}", args).fetchall()
        return [table.decode(r) for r in rows]

    def _insert(self, table: _Table, row: Any) -> None:
        values = table.encode({k: getattr(row, k) for k in table.columns})
        sql = f"INSERT INTO {table.name} ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})"
        with self.transaction():
            self._conn.execute(sql, tuple(values.values()))

    def _require_deployment(self, name: str) -> None:
        if self.get_deployment(name) is None:
            raise StateError(f"{self.path} holds no deployment {name!r}")

    def _update(self, table: _Table, key: tuple[Any, ...], changes: dict[str, Any], what: str) -> Any:
        unknown = sorted(set(changes) - set(table.columns))
        if unknown:
            raise TypeError(f"{table.row.__name__} has no field {', '.join(map(repr, unknown))}")
        fixed = sorted(set(changes) & table.fixed)
        if fixed:
            raise TypeError(f"{table.row.__name__}.{', '.join(fixed)} cannot be updated")
        values = table.encode({**changes, "updated": time.time()})
        where = " AND ".join(f"{k} = ?" for k in table.key)
        with self.transaction():
            cur = self._conn.execute(f"UPDATE {table.name} SET {', '.join(f'{k} = ?' for k in values)} WHERE {where}",
                                     (*values.values(), *key))
            if cur.rowcount == 0:
                raise StateError(f"{self.path} holds no {what}")
            return self._select(table, where, key)[0]

    # -- meta

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """The daemon-wide setting `key`, else `default`."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        """Set the daemon-wide setting `key`."""
        with self.transaction():
            self._conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                               "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    # -- deployments

    def add_deployment(self, d: Deployment) -> Deployment:
        """Add a new deployment (its `created`, if 0, and `updated` stamped now); a taken name is a StateError."""
        _check_deployment_values({"desired": d.desired, "state": d.state})
        now = time.time()
        stored = replace(d, created=d.created or now, updated=now)
        with self.transaction():
            if self.get_deployment(d.name) is not None:
                raise StateError(f"a deployment named {d.name!r} already exists in {self.path}: pick another "
                                 "name, or take it down first")
            self._insert(_DEPLOYMENTS, stored)
        return stored

    def get_deployment(self, name: str) -> Deployment | None:
        """The deployment `name`, or None."""
        rows = self._select(_DEPLOYMENTS, "name = ?", (name,))
        return rows[0] if rows else None

    def deployments(self, *, include_stopped: bool = True) -> list[Deployment]:
        """Every deployment, oldest first; without `include_stopped`, those whose state is not 'stopped'."""
        return self._select(_DEPLOYMENTS, "" if include_stopped else "state != 'stopped'")

    def update_deployment(self, name: str, **fields: Any) -> Deployment:
        """Change some fields of the deployment `name` (stamping `updated`) and return it as stored."""
        _check_deployment_values(fields)
        return self._update(_DEPLOYMENTS, (name,), fields, f"deployment {name!r}")

    def delete_deployment(self, name: str) -> bool:
        """Delete the deployment `name` with its jobs and instances (its events stay); False if there was none."""
        with self.transaction():
            return self._conn.execute("DELETE FROM deployments WHERE name = ?", (name,)).rowcount > 0

    # -- jobs

    def add_job(self, job: Job) -> Job:
        """Add a job of an existing deployment (its `created`, if 0, and `updated` stamped now)."""
        now = time.time()
        stored = replace(job, created=job.created or now, updated=now)
        with self.transaction():
            self._require_deployment(job.deployment)
            if self._select(_JOBS, "backend = ? AND job_id = ?", (job.backend, job.job_id)):
                raise StateError(f"{self.path} already holds {job.backend} job {job.job_id}")
            self._insert(_JOBS, stored)
        return stored

    def jobs(self, deployment: str | None = None, *, live_only: bool = False) -> list[Job]:
        """The jobs of `deployment` (None: of all), oldest first; `live_only`: those not yet ended."""
        clauses = (["deployment = ?"] if deployment is not None else []) + (["ended IS NULL"] if live_only else [])
        return self._select(_JOBS, " AND ".join(clauses), (deployment,) if deployment is not None else ())

    def update_job(self, backend: str, job_id: str, **fields: Any) -> Job:
        """Change some fields of a job (stamping `updated`) and return it as stored."""
        return self._update(_JOBS, (backend, job_id), fields, f"{backend} job {job_id}")

    # -- instances

    def set_instances(self, deployment: str, rows: list[InstanceRow]) -> None:
        """Replace the instances of `deployment` by `rows` in one transaction (each `updated` stamped now)."""
        strays = [r for r in rows if r.deployment != deployment]
        if strays:
            raise ValueError(f"instance {strays[0].llm}/{strays[0].replica} belongs to {strays[0].deployment!r}, "
                             f"not {deployment!r}")
        now = time.time()
        with self.transaction():
            self._require_deployment(deployment)
            self._conn.execute("DELETE FROM instances WHERE deployment = ?", (deployment,))
            for row in rows:
                self._insert(_INSTANCES, replace(row, updated=now))

    def update_instance(self, deployment: str, llm: str, replica: int, job_id: str = "", **fields: Any) -> InstanceRow:
        """Change some fields of one instance (of job `job_id`; stamping `updated`) and return it as stored."""
        return self._update(_INSTANCES, (deployment, job_id, llm, replica), fields,
                            f"instance {llm}/{replica} of deployment {deployment!r}" + (f" in job {job_id}" if job_id else ""))

    def instances(self, deployment: str | None = None) -> list[InstanceRow]:
        """The instances of `deployment` (None: of all), by deployment, LLM and replica."""
        if deployment is None:
            return self._select(_INSTANCES)
        return self._select(_INSTANCES, "deployment = ?", (deployment,))

    # -- events

    def add_event(self, deployment: str | None, kind: str, message: str,
                  data: dict[str, Any] | None = None) -> Event:
        """Append an event stamped now (a message past `MAX_MESSAGE_CHARS` is cut) and return it."""
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS - 1] + "…"
        ts, payload = time.time(), json.dumps(data or {})
        with self.transaction():
            cur = self._conn.execute("INSERT INTO events (ts, deployment, kind, message, data) VALUES (?, ?, ?, ?, ?)",
                                     (ts, deployment, kind, message, payload))
            seq = cur.lastrowid
        assert seq is not None   # set by every INSERT
        return Event(seq, ts, deployment, kind, message, json.loads(payload))   # as a later read returns it

    def events(self, deployment: str | None = None, *, after: int = 0, limit: int = 1000) -> list[Event]:
        """Events with seq > `after` (of `deployment`, or all), oldest first, at most `limit` (≤ MAX_EVENTS)."""
        limit = max(0, min(limit, MAX_EVENTS))
        if deployment is None:
            return self._select(_EVENTS, "seq > ?", (after, limit), " LIMIT ?")
        return self._select(_EVENTS, "seq > ? AND deployment = ?", (after, deployment, limit), " LIMIT ?")

    def prune_events(self, keep: int) -> int:
        """Delete all but the newest `keep` events (seq numbers never repeat); how many went."""
        with self.transaction():
            cur = self._conn.execute("DELETE FROM events WHERE seq <= (SELECT COALESCE(MAX(seq), 0) FROM events) - ?",
                                     (max(0, keep),))
        return int(cur.rowcount or 0)

    def last_event_seq(self) -> int:
        """The seq of the newest event (0 when there is none)."""
        with self._lock:
            return int(self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

    # -- keys

    def add_key(self, key: KeyRow) -> KeyRow:
        """Add a client key (its `created`, if 0, stamped now); a taken id or hash is a StateError."""
        stored = replace(key, created=key.created or time.time())
        with self.transaction():
            if self._select(_KEYS, "id = ? OR sha256 = ?", (key.id, key.sha256)):
                raise StateError(f"{self.path} already holds a key with id {key.id!r} or the same hash")
            self._insert(_KEYS, stored)
        return stored

    def get_key(self, key_id: str) -> KeyRow | None:
        """The key with id `key_id`, or None."""
        rows = self._select(_KEYS, "id = ?", (key_id,))
        return rows[0] if rows else None

    def keys(self, deployment: str | None = None, *, include_revoked: bool = True) -> list[KeyRow]:
        """The keys of `deployment` (None: of all), oldest first; without `include_revoked`, the working ones."""
        clauses = (["deployment = ?"] if deployment is not None else []) + ([] if include_revoked else
                                                                            ["revoked_at IS NULL"])
        return self._select(_KEYS, " AND ".join(clauses), (deployment,) if deployment is not None else ())

    def revoke_key(self, key_id: str, when: float | None = None) -> KeyRow:
        """Mark the key revoked (now, or at `when`) and return it as stored; StateError if there is no such key."""
        with self.transaction():
            cur = self._conn.execute("UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                                     (time.time() if when is None else when, key_id))
            row = self.get_key(key_id)
            if row is None or cur.rowcount == 0 and row.revoked_at is None:
                raise StateError(f"{self.path} holds no key {key_id!r}")
            return row
