"""A serving session on disk: what `scepsy up` started, for `status` and `down` in other processes.

    <state dir>/<name>/session.json   backend, job id, state, gateway URL, the `up` process
                      /serve.json     the engines for the node agents (from the plan's placement)
                      /plan.yaml      the plan served
                      /endpoints.yaml the gateway's replicas (rewritten as agents report)
                      /agents/N.json  each node agent's report
                      /logs/          the job script, job and agent output, one log per engine
                      /trace.jsonl    every call through the gateway

The state dir is $SCEPSY_STATE_DIR, else ~/.scepsy/sessions; on a cluster it must be on a file
system the compute nodes share (home directories are).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scepsy_hpc.backend.base import check_name
from scepsy_hpc.backend.records import RERUN, AgentReport, ServeConfig, SessionRecord
from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.records import read_record, write_record


def state_root(arg: str | None = None) -> Path:
    """--state-dir, else $SCEPSY_STATE_DIR, else ~/.scepsy/sessions (absolute)."""
    return Path(arg or os.environ.get("SCEPSY_STATE_DIR") or Path.home() / ".scepsy" / "sessions").absolute()


@dataclass(frozen=True)
class Session:
    """One named session directory."""

    dir: Path

    @property
    def name(self) -> str:
        """The session's name (its directory's)."""
        return self.dir.name

    @property
    def info_path(self) -> Path:
        """session.json."""
        return self.dir / "session.json"

    @property
    def serve_path(self) -> Path:
        """serve.json."""
        return self.dir / "serve.json"

    @property
    def endpoints_path(self) -> Path:
        """The gateway's endpoints file."""
        return self.dir / "endpoints.yaml"

    @property
    def log_dir(self) -> Path:
        """Job script, job and agent output, engine logs."""
        return self.dir / "logs"

    def info(self) -> SessionRecord:
        """session.json (an empty record before `up` wrote it)."""
        try:
            return read_record(self.info_path, SessionRecord, f"remove {self.dir} to start over")
        except FileNotFoundError:
            return SessionRecord()

    def update(self, **fields: Any) -> SessionRecord:
        """Merge `fields` into session.json (atomically, readable by its owner only)."""
        record = SessionRecord.model_validate({**self.info().model_dump(), **fields, "updated": time.time()})
        write_record(self.info_path, record)
        return record

    def serve_config(self) -> ServeConfig:
        """serve.json."""
        return read_record(self.serve_path, ServeConfig, RERUN)

    def write_serve_config(self, config: ServeConfig) -> None:
        """Write serve.json (atomically, readable by its owner only)."""
        write_record(self.serve_path, config)

    def agents(self) -> dict[str, AgentReport]:
        """Each node agent's latest report, by node."""
        out = {}
        for p in sorted((self.dir / "agents").glob("*.json")):
            try:
                out[p.stem] = read_record(p, AgentReport, RERUN)
            except FileNotFoundError:
                continue  # removed by a new `up` while we looked
        return out


def open_session(name: str, root: Path) -> Session:
    """The session called `name` under `root` (the name checked: it goes into job names and paths)."""
    return Session(root / check_name(name, "session name"))


def find_session(name: str | None, root: Path) -> Session:
    """The named session, or the only one there is; a clear error otherwise."""
    if name:
        s = open_session(name, root)
        if not s.info_path.exists():
            raise SpecError(f"no session {name!r} in {root}; sessions there: {', '.join(list_sessions(root)) or 'none'}")
        return s
    names = list_sessions(root)
    live = [n for n in names if Session(root / n).info().state not in ("down", "ended", "failed")]
    pick = live or names
    if len(pick) == 1:
        return Session(root / pick[0])
    if not pick:
        raise SpecError(f"no session in {root}: start one with `scepsy up PLAN`")
    raise SpecError(f"several sessions in {root} ({', '.join(pick)}): name one")


def list_sessions(root: Path) -> list[str]:
    """Session names under `root`."""
    return sorted(p.parent.name for p in root.glob("*/session.json"))
