"""The daemon as users run it: `scepsy` subprocesses against a detached daemon on a temporary state dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

SCEPSY = [sys.executable, "-m", "scepsy_hpc.cli"]


def scepsy(state: Path, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run `scepsy ARGS --state-dir STATE`."""
    return subprocess.run([*SCEPSY, *args, "--state-dir", str(state)], capture_output=True, text=True, timeout=timeout_s)


def status(state: Path, name: str) -> dict[str, Any]:
    """`scepsy status NAME --json`."""
    done = scepsy(state, "status", name, "--json")
    return json.loads(done.stdout)


def wait_state(state: Path, name: str, want: str | tuple[str, ...], timeout_s: float = 90.0,
               check: Any = None) -> dict[str, Any]:
    """Until the deployment is in `want` (and `check(doc)` holds); its status."""
    wants = (want,) if isinstance(want, str) else want
    deadline = time.monotonic() + timeout_s
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = status(state, name)
        if doc.get("state") in wants and (check is None or check(doc)):
            return doc
        time.sleep(0.2)
    events = scepsy(state, "events", name).stdout
    pytest.fail(f"{name} never reached {wants}: last {json.dumps(doc)[:2000]}\nevents:\n{events[-3000:]}")


def small_plan(path: Path, workflow: str = "rag_rerank", nodes: tuple[str, str] = ("node1", "node2")) -> Path:
    """A placed plan of rag_rerank (3 engines: one tp=4, two sharing a GPU) or mixture_of_agents-free shapes."""
    a, b = nodes
    plan = {"workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 5},
            "allocation": {"generator": {"tp": 4}, "rewriter": {"gpu_frac": 0.5}, "reranker": {"gpu_frac": 0.5}},
            "placement": [
                {"llm": "generator", "replica": 0, "node": a, "gpus": [0, 1, 2, 3]},
                {"llm": "rewriter", "replica": 0, "node": b, "gpus": [0]},
                {"llm": "reranker", "replica": 0, "node": b, "gpus": [0]}]}
    assert workflow == "rag_rerank"
    path.write_text(yaml.safe_dump(plan))
    return path


def owner_key(state: Path, name: str) -> str:
    """The owner key `up` made for deployment `name` (read from its owner.key, as `scepsy keys show` does)."""
    return (state / "deployments" / name / "owner.key").read_text().strip()


def daemon_key(state: Path) -> str:
    """The daemon's own key (every deployment), from the state."""
    from scepsy_hpc.service.state import StateStore

    with StateStore(state / "state.db") as store:
        return store.get_meta("daemon_key") or ""


def alive(pid: int | None) -> bool:
    """Whether `pid` runs (a zombie counts as gone)."""
    if not pid:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


@pytest.fixture
def sv() -> Any:
    """The helpers above, for the test modules (conftest is not importable under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(scepsy=scepsy, status=status, wait_state=wait_state, small_plan=small_plan, alive=alive,
                           owner_key=owner_key, daemon_key=daemon_key)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A state dir; whatever daemon, gateway or job is left in it at the end is stopped."""
    root = tmp_path / "state"
    yield root
    if (root / "daemon.lock").exists():
        subprocess.run([*SCEPSY, "daemon", "stop", "--all", "--timeout", "60", "--state-dir", str(root)],
                       capture_output=True, timeout=90)
    for pid_file in [root / "daemon.lock"]:
        try:
            pid = int(pid_file.read_text().split()[0])
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
    from scepsy_hpc.engine.supervisor import stop_group
    from scepsy_hpc.service.state import StateStore

    if (root / "state.db").exists():
        try:
            with StateStore(root / "state.db") as store:
                gw = store.get_meta("gateway_pid")
                if gw and gw.isdigit() and alive(int(gw)):
                    stop_group(int(gw), 5)
                for inst in store.instances():
                    if inst.pid and alive(inst.pid):
                        stop_group(inst.pid, 5)
        except Exception:   # cleanup must not hide the test's own failure
            pass
    for job in (root / ".local-jobs").glob("local-*"):
        pgid = int(job.name.split("-", 1)[1])
        stop_group(pgid, 5)
