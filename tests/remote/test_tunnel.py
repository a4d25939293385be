"""`scepsy --remote scepsy-login tunnel NAME` through OpenSSH's sshd (scripts/sshd-local.sh), as a user runs it.

The login node is this machine: a daemon on a temporary state dir serves a small deployment (local backend,
simulated engines), and the remote scepsy is this checkout's, pointed at that state dir (--remote-scepsy).
Each test runs the tunnel as a subprocess and calls through it with the openai SDK: a streamed completion and
concurrent calls over the one SSH connection (sshd's log shows a direct-tcpip forward per local connection),
the tunnel back after sshd's side of its connection is killed, Ctrl-C and SIGTERM closing it cleanly, and an
unknown deployment refused.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

pytestmark = pytest.mark.ssh

ROOT = Path(__file__).resolve().parents[2]
SCEPSY = [sys.executable, "-m", "scepsy_hpc.cli"]
NAME = "tun"
PLAN = {"workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 5},
        "allocation": {"generator": {"tp": 4}, "rewriter": {"gpu_frac": 0.5}, "reranker": {"gpu_frac": 0.5}},
        "placement": [{"llm": "generator", "replica": 0, "node": "node1", "gpus": [0, 1, 2, 3]},
                      {"llm": "rewriter", "replica": 0, "node": "node2", "gpus": [0]},
                      {"llm": "reranker", "replica": 0, "node": "node2", "gpus": [0]}]}


@dataclass(frozen=True)
class Deployment:
    state: Path
    key: str
    base_url: str           # as the login node sees it
    remote_scepsy: str      # this checkout's scepsy on that state dir, as the sshd runs it

    @property
    def gateway_port(self) -> int:
        return int(self.base_url.split(":")[2].split("/")[0])


def _scepsy(state: Path, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SCEPSY, *args, "--state-dir", str(state)], capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.fixture(scope="module")
def deployment(sshd: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Deployment `tun` serving on a fresh daemon (stopped, with everything it started, at the end)."""
    tmp = tmp_path_factory.mktemp("tunnel")
    state = tmp / "state"
    plan = tmp / "plan.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    try:
        started = _scepsy(state, "daemon", "start", "--poll", "0.5")
        assert started.returncode == 0, started.stderr
        up = _scepsy(state, "up", str(plan), "--name", NAME, "--detach", "--time-scale", "0.05")
        assert up.returncode == 0, up.stderr
        deadline, doc = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            doc = json.loads(_scepsy(state, "status", NAME, "--json").stdout)
            if doc.get("state") == "serving":
                break
            time.sleep(0.2)
        assert doc.get("state") == "serving", doc
        remote = (f"env SCEPSY_STATE_DIR={shlex.quote(str(state))} PYTHONPATH={shlex.quote(str(ROOT))} "
                  f"{shlex.quote(sys.executable)} -m scepsy_hpc.cli")
        key = (state / "deployments" / NAME / "owner.key").read_text().strip()
        yield Deployment(state, key, doc["base_url"], remote)
    finally:
        _stop_everything(state)


def _stop_everything(state: Path) -> None:
    if (state / "daemon.lock").exists():
        _scepsy(state, "daemon", "stop", "--all", "--timeout", "60", timeout_s=90)
    from scepsy_hpc.engine.supervisor import stop_group

    for job in (state / ".local-jobs").glob("local-*"):   # what a failed stop left
        stop_group(int(job.name.split("-", 1)[1]), 5)


class TunnelProcess:
    """`scepsy --remote scepsy-login … tunnel NAME --json` running; its stderr collected line by line."""

    def __init__(self, dep: Deployment, name: str = NAME, *extra: str, host: str = "scepsy-login") -> None:
        argv = [*SCEPSY, "--remote", host, "--remote-scepsy", dep.remote_scepsy, "tunnel", name, "--json",
                *extra]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.said: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.said.append(line.rstrip("\n"))

    def ready(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """The one JSON document it prints on stdout once listening."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        assert ready, f"no JSON document within {timeout_s} s; stderr: {self.said}"
        line = self.proc.stdout.readline()
        assert line, f"the tunnel ended (rc {self.proc.wait(5)}) before it was ready: {self.said}"
        return dict(json.loads(line))

    def wait_said(self, text: str, timeout_s: float = 30.0) -> int:
        """The index of the first stderr line holding `text`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i, line in enumerate(list(self.said)):
                if text in line:
                    return i
            time.sleep(0.05)
        raise AssertionError(f"the tunnel never said {text!r}; it said {self.said}")

    def end(self, sig: int = signal.SIGINT, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout_s)
        self._reader.join(5)
        return rc


@pytest.fixture
def tunnels(deployment: Deployment) -> Iterator[list[TunnelProcess]]:
    """Tunnels a test started; any left running are killed at the end."""
    made: list[TunnelProcess] = []
    yield made
    for t in made:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait(10)


def _open(tunnels: list[TunnelProcess], dep: Deployment, *extra: str,
          host: str = "scepsy-login") -> tuple[TunnelProcess, dict[str, Any]]:
    t = TunnelProcess(dep, NAME, *extra, host=host)
    tunnels.append(t)
    return t, t.ready()


def _client(url: str, key: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


def _chat(client: Any, *, stream: bool) -> list[str]:
    """The content pieces of one small chat completion (one piece when not streamed)."""
    messages = [{"role": "user", "content": "hello"}]
    if stream:
        chunks = client.chat.completions.create(model="generator", messages=messages, max_tokens=8, stream=True)
        return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    return [client.chat.completions.create(model="generator", messages=messages, max_tokens=4).choices[0].message.content]


def test_a_streamed_completion_and_concurrent_calls_go_through_one_ssh_connection(sshd: Any, deployment: Deployment,
                                                                                 tunnels: list[TunnelProcess]) -> None:
    t, doc = _open(tunnels, deployment)
    port = doc["local_port"]
    assert doc["local_url"] == f"http://127.0.0.1:{port}/d/{NAME}/v1"
    assert (doc["remote"], doc["gateway"]) == ("scepsy-login", deployment.base_url)
    assert doc["key_command"] == f"scepsy --remote scepsy-login keys show {NAME}"
    ssh_connections = len(sshd.connections("login"))
    since = sshd.log_offset("login")

    pieces = _chat(_client(doc["local_url"], deployment.key), stream=True)
    assert len(pieces) >= 2 and "".join(pieces).strip(), pieces      # streamed: several chunks, each as it came

    def one(i: int) -> list[str]:   # each thread its own client, so its own local connection and channel
        return _chat(_client(doc["local_url"], deployment.key), stream=i % 2 == 0)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    assert all("".join(a).strip() for a in answers), answers
    assert len(sshd.connections("login")) == ssh_connections        # no new SSH connection for any of them
    forwards = [line for line in sshd.log_text("login", since=since).splitlines()
                if "server_request_direct_tcpip" in line and f"port {deployment.gateway_port}" in line]
    assert len(forwards) >= 13, forwards                             # one channel per local connection

    assert t.end() == 0
    assert t.proc.stdout is not None and t.proc.stdout.read() == ""  # the one document, nothing after it
    assert any(f"http://127.0.0.1:{port}/d/{NAME}/v1 → {deployment.base_url} on scepsy-login" in s for s in t.said)
    assert any(f"$(scepsy --remote scepsy-login keys show {NAME})" in s for s in t.said)


def test_the_tunnel_is_re_established_after_the_server_kills_its_connection(sshd: Any, deployment: Deployment,
                                                                           tunnels: list[TunnelProcess]) -> None:
    t, doc = _open(tunnels, deployment)
    client = _client(doc["local_url"], deployment.key)
    assert _chat(client, stream=False)
    killed = sshd.kill_connections("login")
    assert killed
    t0 = time.monotonic()
    # a call right away: its local connection waits for the connection to come back, then goes through
    assert _chat(_client(doc["local_url"], deployment.key), stream=True)
    back_s = time.monotonic() - t0
    lost = t.wait_said("tunnel: the connection to scepsy-login was lost")
    back = t.wait_said("tunnel: re-established (attempt 1)")
    assert lost < back and "reconnecting in" in t.said[lost], t.said
    assert back_s < 15, t.said
    assert _chat(client, stream=False) and _chat(client, stream=True)    # the first client too, same local port
    assert t.proc.poll() is None and t.end() == 0


def test_a_tunnel_through_proxyjump(sshd: Any, deployment: Deployment, tunnels: list[TunnelProcess]) -> None:
    jump_since, login_since = sshd.log_offset("jump"), sshd.log_offset("login")
    t, doc = _open(tunnels, deployment, host="scepsy-via-jump")
    assert doc["remote"] == "scepsy-via-jump" and doc["gateway"] == deployment.base_url
    assert len(_chat(_client(doc["local_url"], deployment.key), stream=True)) >= 2
    assert f"port {sshd.login_port}" in sshd.log_text("jump", since=jump_since)      # the jump host forwarded
    assert f"port {deployment.gateway_port}" in sshd.log_text("login", since=login_since)
    assert t.end() == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_close_the_tunnel_cleanly(sshd: Any, deployment: Deployment,
                                                     tunnels: list[TunnelProcess], sig: int) -> None:
    before = {c.pid for c in sshd.connections("login")}
    t, doc = _open(tunnels, deployment)
    client = _client(doc["local_url"], deployment.key)
    assert _chat(client, stream=True)                       # its keep-alive connection stays open
    ours = [c for c in sshd.connections("login") if c.pid not in before]
    assert len(ours) == 1, ours
    assert t.end(sig) == 0
    assert t.said[-1] == "tunnel closed" and not any("Traceback" in s for s in t.said), t.said
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", doc["local_port"]), timeout=2)
    deadline = time.monotonic() + 10
    while any(c.pid == ours[0].pid for c in sshd.connections("login")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(c.pid != ours[0].pid for c in sshd.connections("login"))   # the SSH connection was closed


def test_an_unknown_deployment_is_refused_before_listening(sshd: Any, deployment: Deployment) -> None:
    argv = [*SCEPSY, "--remote", "scepsy-login", "--remote-scepsy", deployment.remote_scepsy, "tunnel", "nope", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    err = json.loads(done.stdout)["error"]      # --json: one document, the error's
    assert err["type"] == "SpecError"
    assert err["message"].startswith("on scepsy-login: no deployment 'nope' here")
    assert f"deployments: {NAME}" in err["message"] and "no deployment 'nope'" in done.stderr


def test_a_missing_remote_scepsy_is_named_with_the_fix(sshd: Any) -> None:
    argv = [*SCEPSY, "--remote", "scepsy-login", "--remote-scepsy", "/nonexistent/scepsy", "tunnel", NAME]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "SCEPSY_DEBUG": ""})
    assert done.returncode == 255, done.stderr
    assert "scepsy-login: `/nonexistent/scepsy` was not found there" in done.stderr and "--remote-scepsy" in done.stderr
