"""The agent's progress watchdog (an engine whose requests wait while its token counters stand still is wedged,
although /health answers 200: killed and restarted like one that exited) and its drain on the walltime
warning. Real agent processes with sim engines, Linux only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from scepsy_hpc.backend.agent import HEARTBEAT_ENV, WEDGED_STOP_GRACE_S, Progress, progress, wedged_reason
from scepsy_hpc.backend.records import RERUN, AgentReport, InstanceReport, ServeConfig, ServeInstance
from scepsy_hpc.engine.adapters import EngineLaunch
from scepsy_hpc.engine.metrics import EngineLoad
from scepsy_hpc.engine.sim_server import FAULT_PATH
from scepsy_hpc.engine.supervisor import is_healthy, stop_group
from scepsy_hpc.spec.records import read_record, write_record

ROOT = str(Path(__file__).resolve().parents[3])
STALL_S, CHECK_S = 2.0, 0.5
pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc"),
              pytest.mark.timeout(60)]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SECRET = "watchdog-engine-secret"   # the engines need it; the watchdog's /metrics reads do not
AUTH = {"Authorization": f"Bearer {SECRET}"}


def test_only_a_busy_engine_whose_tokens_stand_still_is_wedged() -> None:
    busy, idle = EngineLoad(waiting=3, running=0, tokens=100.0), EngineLoad(waiting=0, running=0, tokens=100.0)
    p, why = wedged_reason(None, busy, 10.0, STALL_S)
    assert p == Progress(100.0, 10.0) and why == ""           # the first look starts the clock
    p, why = wedged_reason(p, busy, 11.9, STALL_S)
    assert p == Progress(100.0, 10.0) and why == ""
    assert wedged_reason(p, None, 12.5, STALL_S) == (p, "")   # an unreadable page proves nothing
    _, why = wedged_reason(p, busy, 12.0, STALL_S)
    assert why == "wedged: 3 request(s) waiting and 0 running, no token for 2 s"
    assert wedged_reason(p, busy, 60.0, 0.0)[1] == ""          # 0: the watchdog judges nothing
    # tokens that move, or an idle engine, restart the clock
    assert progress(p, EngineLoad(3, 0, 101.0), 12.0) == Progress(101.0, 12.0)
    assert progress(p, idle, 30.0) == Progress(100.0, 30.0)
    assert wedged_reason(Progress(100.0, 0.0), idle, 500.0, STALL_S) == (Progress(100.0, 500.0), "")


def _launch(llm: str) -> EngineLaunch:
    return EngineLaunch("sim", "llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", llm, "h100-sxm",
                        host="127.0.0.1", port=0, time_scale=0.05)


def _report(session: Path) -> AgentReport | None:
    try:
        return read_record(session / "agents" / "n1.json", AgentReport, RERUN)
    except (FileNotFoundError, ValueError):
        return None


def _engine(session: Path, llm: str) -> InstanceReport | None:
    report = _report(session)
    return next(i for i in report.instances if i.llm == llm) if report else None


def _until(check, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    return None


@pytest.fixture
def agent(tmp_path: Path):
    """Start an agent on node n1 serving one sim engine per LLM (watchdog: stall 2 s, a look every 0.5 s);
    the running agent process and its session directory, once it is ready."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(llms: list[str], **env: str) -> tuple[subprocess.Popen[bytes], Path]:
        config = ServeConfig(engine="sim", health_timeout_s=30.0, max_restarts=3, progress_check_s=CHECK_S,
                             engine_secret=SECRET,
                             stall_timeout_s=STALL_S, instances=[
                                 ServeInstance(llm=llm, replica=0, node="n1", gpus=[i], gpu_frac=1.0, mps_pct=100,
                                               port=0, launch=_launch(llm)) for i, llm in enumerate(llms)])
        write_record(tmp_path / "serve.json", config)
        full_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "SUBMITIT", "SCEPSY_SIM"))},
                    "PYTHONPATH": ROOT, "SCEPSY_BIND_HOST": "127.0.0.1", "SCEPSY_SIM_TEST_HOOKS": "1", **env}
        with open(tmp_path / "agent.out", "wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "scepsy_hpc.backend.agent", "--session",
                                           str(tmp_path), "--node", "n1"], env=full_env, start_new_session=True,
                                          stdout=out, stderr=subprocess.STDOUT))
        assert _until(lambda: (r := _report(tmp_path)) is not None and r.state == "ready"), \
            (tmp_path / "agent.out").read_text()
        return procs[-1], tmp_path

    yield run
    for p in procs:
        stop_group(p.pid, 5)


def _wedge(url: str) -> None:
    req = urllib.request.Request(url + FAULT_PATH, data=json.dumps({"wedge": True}).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **AUTH})
    with _NO_PROXY.open(req, timeout=5) as resp:
        assert json.load(resp)["wedged"] is True


def _send_and_hold(url: str, n: int) -> list[socket.socket]:
    """`n` completion requests sent over connections held open (the engine queues them, nobody reads)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": [1] * 20, "max_tokens": 50}).encode()
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (SECRET.encode(), len(body), body))
        socks.append(s)
    return socks


def _complete(url: str) -> None:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({"prompt": [1] * 20, "max_tokens": 200})
                                 .encode(), headers={"Content-Type": "application/json", **AUTH}, method="POST")
    with _NO_PROXY.open(req, timeout=10) as resp:
        assert json.load(resp)["usage"]["completion_tokens"] == 200


def test_a_wedged_engine_with_waiting_requests_is_restarted_on_its_url(agent) -> None:
    _, session = agent(["a"])
    first = _engine(session, "a")
    _wedge(first.url)
    wedged_at = time.time()
    socks = _send_and_hold(first.url, 3)
    try:
        again = _until(lambda: (e := _engine(session, "a")) is not None and e.restarts == 1 and e.healthy and e)
    finally:
        for s in socks:
            s.close()
    assert again, _report(session)
    assert again.last_restart_reason.startswith("wedged: 3 request(s) waiting and 0 running, no token for ")
    assert again.last_restart_reason.endswith("although /health answered 200")
    # judged after stall_timeout_s (its clock starts at the last look that saw the engine idle, up to a
    # check period earlier), then stopped (TERM, KILL after a grace) and restarted after the 1 s backoff
    down_s = again.last_restart_at - wedged_at
    assert STALL_S - CHECK_S <= down_s <= STALL_S + CHECK_S + WEDGED_STOP_GRACE_S + 1.0 + 1.0, down_s
    assert again.pid != first.pid and again.url == first.url and is_healthy(again.url)
    _complete(again.url)   # the new engine is not wedged
    report = _report(session)
    assert report.state == "ready" and report.instances[0].restarts == 1


def test_an_idle_engine_and_a_busy_one_that_progresses_are_left_alone(agent) -> None:
    _, session = agent(["idle", "busy"])
    idle, busy = _engine(session, "idle"), _engine(session, "busy")
    _wedge(idle.url)   # its counters stand still, but nothing waits on it
    done, stop = [], threading.Event()

    def keep_busy() -> None:
        while not stop.is_set():
            _complete(busy.url)
            done.append(1)

    worker = threading.Thread(target=keep_busy)
    worker.start()
    try:
        time.sleep(STALL_S + 4 * CHECK_S)
    finally:
        stop.set()
        worker.join(10)
    assert len(done) >= 3
    report = _report(session)
    assert report.state == "ready"
    assert [(i.llm, i.restarts, i.pid, i.last_restart_reason) for i in report.instances] == \
        [("idle", 0, idle.pid, ""), ("busy", 0, busy.pid, "")]
    # the watchdog was looking: requests now on the wedged idle engine get it restarted
    socks = _send_and_hold(idle.url, 1)
    try:
        assert _until(lambda: (e := _engine(session, "idle")).restarts == 1 and "1 request(s)" in e.last_restart_reason)
    finally:
        socks[0].close()


def test_the_walltime_warning_marks_the_report_draining_at_once_and_the_engines_serve_on(agent) -> None:
    proc, session = agent(["a"], **{HEARTBEAT_ENV: "60"})   # no heartbeat write to hide behind
    before = _report(session)
    assert before.draining_since is None
    t0 = time.time()
    proc.send_signal(signal.SIGUSR1)
    draining = _until(lambda: (r := _report(session)) is not None and r.draining_since is not None and r, 1.0)
    assert draining, _report(session)
    assert t0 <= draining.draining_since <= time.time()
    assert draining.state == "ready" and proc.poll() is None
    engine = draining.instances[0]
    assert engine.healthy and engine.pid == before.instances[0].pid
    os.killpg(engine.pid, signal.SIGUSR1)   # Slurm signals every process of the job step: the engines ignore it
    time.sleep(0.5)
    after = _report(session).instances[0]
    assert (after.pid, after.restarts, after.healthy) == (engine.pid, 0, True)
    _complete(engine.url)
    proc.send_signal(signal.SIGUSR1)   # a second warning keeps the first time
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    final = _report(session)
    assert final.state == "stopped" and final.draining_since == draining.draining_since
    assert "got SIGUSR1; draining: the engines keep serving until SIGTERM" in (session / "agent.out").read_text()


def test_the_engines_need_the_job_secret_get_it_by_environment_and_bind_the_given_address(agent) -> None:
    _, session = agent(["a"])
    engine = _engine(session, "a")
    assert engine.url.startswith("http://127.0.0.1:")
    req = urllib.request.Request(engine.url + "/v1/models")
    with pytest.raises(urllib.error.HTTPError) as exc:
        _NO_PROXY.open(req, timeout=5)
    assert exc.value.code == 401
    _complete(engine.url)   # with the secret
    assert SECRET.encode() not in Path(f"/proc/{engine.pid}/cmdline").read_bytes()   # what `ps` shows any user
    assert f"SCEPSY_ENGINE_API_KEY={SECRET}".encode() in Path(f"/proc/{engine.pid}/environ").read_bytes().split(b"\0")
    bound = {line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:] if line.split()[3] == "0A"}
    assert f"0100007F:{engine.port:04X}" in bound and f"00000000:{engine.port:04X}" not in bound   # loopback only
