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

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from scepsy_hpc.backend.base import check_name
from scepsy_hpc.errors import ScepsyError, SpecError


def state_root(arg: str | None = None) -> Path:
    """--state-dir, else $SCEPSY_STATE_DIR, else ~/.scepsy/sessions (absolute)."""
    return Path(arg or os.environ.get("SCEPSY_STATE_DIR") or Path.home() / ".scepsy" / "sessions").absolute()


@dataclass(frozen=True)
class Session:
    """One named session directory."""

    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def info_path(self) -> Path:
        return self.dir / "session.json"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    def info(self) -> dict[str, Any]:
        """session.json ({} before `up` wrote it)."""
        try:
            return json.loads(self.info_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ScepsyError(f"{self.info_path}: unreadable session record ({exc}); remove the directory to start over") from None

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into session.json (atomically)."""
        data = {**self.info(), **fields, "updated": time.time()}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.info_path)
        return data

    def agents(self) -> dict[str, dict[str, Any]]:
        """Each node agent's latest report, by node."""
        out = {}
        for p in sorted((self.dir / "agents").glob("*.json")):
            try:
                out[p.stem] = json.loads(p.read_text())
            except (OSError, ValueError):
                continue  # being replaced right now: read it next time
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
    live = [n for n in names if Session(root / n).info().get("state") not in ("down", "ended", "failed")]
    pick = live or names
    if len(pick) == 1:
        return Session(root / pick[0])
    if not pick:
        raise SpecError(f"no session in {root}: start one with `scepsy up PLAN`")
    raise SpecError(f"several sessions in {root} ({', '.join(pick)}): name one")


def list_sessions(root: Path) -> list[str]:
    """Session names under `root`."""
    return sorted(p.parent.name for p in root.glob("*/session.json"))


def endpoints_from_agents(agents: Mapping[str, Mapping[str, Any]], time_scale: float | None) -> dict[str, Any]:
    """The gateway's endpoints file content: each LLM's healthy replicas."""
    llms: dict[str, dict[str, Any]] = {}
    for report in agents.values():
        for inst in report.get("instances", []):
            entry = llms.setdefault(inst["llm"], {"served_model": inst["llm"], "replicas": []})
            if inst.get("healthy") and inst.get("url"):
                entry["replicas"].append(inst["url"])
    out: dict[str, Any] = {"llms": llms}
    if time_scale:
        out["time_scale"] = time_scale
    return out
