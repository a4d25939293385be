"""An engine that exits while serving is restarted by its agent (after a backoff, on the same URL), at most
`max_restarts` times within `restart_window_s`; then it is left failed and the other engines serve on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scepsy_hpc.backend.records import RERUN, AgentReport, ServeConfig, ServeInstance
from scepsy_hpc.engine.adapters import EngineLaunch
from scepsy_hpc.engine.supervisor import is_healthy, stop_group
from scepsy_hpc.spec.records import read_record, write_record

ROOT = str(Path(__file__).resolve().parents[3])
pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc"),
              pytest.mark.timeout(120)]


def _session(tmp_path: Path, llms: list[str], max_restarts: int) -> Path:
    launch = [EngineLaunch("sim", "llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", llm, "h100-sxm",
                           host="127.0.0.1", port=0, time_scale=0.05) for llm in llms]
    config = ServeConfig(engine="sim", health_timeout_s=30.0, max_restarts=max_restarts, restart_window_s=600.0,
                         instances=[ServeInstance(llm=llm, replica=0, node="n1", gpus=[i], gpu_frac=1.0, mps_pct=100,
                                                  port=0, launch=launch[i]) for i, llm in enumerate(llms)])
    write_record(tmp_path / "serve.json", config)
    return tmp_path


def _report(session: Path) -> AgentReport | None:
    try:
        return read_record(session / "agents" / "n1.json", AgentReport, RERUN)
    except (FileNotFoundError, ValueError):
        return None


def _until(check, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    return None


def _engine(session: Path, llm: str):
    report = _report(session)
    return next(i for i in report.instances if i.llm == llm) if report else None


@pytest.fixture
def agent(tmp_path: Path):
    procs: list[subprocess.Popen[bytes]] = []

    def run(llms: list[str], max_restarts: int) -> Path:
        session = _session(tmp_path, llms, max_restarts)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM")}, "PYTHONPATH": ROOT,
               "SCEPSY_BIND_HOST": "127.0.0.1"}
        with open(tmp_path / "agent.out", "wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "scepsy_hpc.backend.agent", "--session", str(session),
                                           "--node", "n1"], env=env, start_new_session=True, stdout=out,
                                          stderr=subprocess.STDOUT))
        assert _until(lambda: (r := _report(session)) is not None and r.state == "ready"), \
            (tmp_path / "agent.out").read_text()
        return session

    yield run
    for p in procs:
        stop_group(p.pid, 5)


def test_an_engine_killed_while_serving_is_restarted_on_the_same_url(agent) -> None:
    session = agent(["a"], max_restarts=3)
    first = _engine(session, "a")
    assert first.last_restart_reason == "" and first.last_restart_at is None
    killed_at = time.time()
    os.killpg(first.pid, signal.SIGKILL)
    again = _until(lambda: (e := _engine(session, "a")) is not None and e.restarts == 1 and e.healthy and e)
    assert again, _report(session)
    assert again.pid != first.pid and again.url == first.url and is_healthy(again.url)
    assert again.last_restart_reason == "exited with code -9" and again.last_restart_at - killed_at >= 1.0   # backoff
    assert _report(session).state == "ready"


def test_an_engine_that_keeps_exiting_is_left_failed_and_the_others_serve_on(agent) -> None:
    session = agent(["a", "b"], max_restarts=1)
    os.killpg(_engine(session, "a").pid, signal.SIGKILL)
    back = _until(lambda: (e := _engine(session, "a")) is not None and e.restarts == 1 and e.healthy and e)
    assert back, _report(session)
    os.killpg(back.pid, signal.SIGKILL)
    failed = _until(lambda: (e := _engine(session, "a")) is not None and e.state == "failed" and e)
    assert failed and "more than the 1 restarts allowed" in failed.error and not failed.healthy
    time.sleep(1.5)   # past the first backoff: no further restart
    assert _engine(session, "a").restarts == 1
    b = _engine(session, "b")
    assert b.healthy and is_healthy(b.url) and _report(session).state == "ready"
