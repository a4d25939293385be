"""The daemon on the local backend, end to end with real processes: two deployments through one gateway,
`kill -9` of the daemon under load (no request fails) and adoption of the same jobs and engines, a killed
node agent seen within one poll, `down --all` leaving no process."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

POLL = "0.5"


def _chat(base_url: str, model: str, key: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    return out.choices[0].message.content or ""


def _engine_pids(doc: dict) -> dict[tuple[str, int], int]:
    return {(i["llm"], i["replica"]): i["pid"] for i in doc["instances"]}


def test_two_deployments_survive_a_daemon_kill9_under_load_and_down_all_leaves_nothing(tmp_path: Path, state: Path,
                                                                                       sv: Any) -> None:
    scepsy, status, wait_state, small_plan, alive = sv.scepsy, sv.status, sv.wait_state, sv.small_plan, sv.alive
    started = scepsy(state, "daemon", "start", "--poll", POLL, "--json")
    assert started.returncode == 0, started.stderr
    first = json.loads(started.stdout)
    again = scepsy(state, "daemon", "start")
    assert again.returncode == 1 and f"pid {first['pid']}" in again.stderr, again.stderr

    for name, nodes in (("alpha", ("node1", "node2")), ("beta", ("node3", "node4"))):
        up = scepsy(state, "up", str(small_plan(tmp_path / f"{name}.yaml", nodes=nodes)), "--name", name, "--detach",
                    "--time-scale", "0.05")
        assert up.returncode == 0, up.stderr
    docs = {n: wait_state(state, n, "serving") for n in ("alpha", "beta")}
    gateway = docs["alpha"]["gateway_url"]
    assert gateway == docs["beta"]["gateway_url"]
    # each deployment through the one gateway: by its own names under /d/NAME, and as NAME/LLM at the root
    keys = {n: sv.owner_key(state, n) for n in ("alpha", "beta")}
    assert _chat(f"{gateway}/d/alpha/v1", "generator", keys["alpha"])
    assert _chat(f"{gateway}/v1", "beta/rewriter", keys["beta"])
    jobs = {n: d["job_id"] for n, d in docs.items()}
    pids = {n: _engine_pids(d) for n, d in docs.items()}

    failures: list[str] = []
    done = threading.Event()
    count = [0]

    def load() -> None:
        while not done.is_set():
            for name in ("alpha", "beta"):
                try:
                    _chat(f"{gateway}/d/{name}/v1", "reranker", keys[name])
                    count[0] += 1
                except Exception as exc:   # every failure is the test's finding
                    failures.append(f"{name}: {exc}")

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        os.kill(first["pid"], signal.SIGKILL)
        time.sleep(2.0)
        during = count[0]
        restarted = scepsy(state, "daemon", "start", "--poll", POLL, "--json")
        assert restarted.returncode == 0, restarted.stderr
        time.sleep(1.5)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    assert not failures, failures[:5]
    assert count[0] > during > 0
    again_docs = {n: wait_state(state, n, "serving") for n in ("alpha", "beta")}
    assert {n: d["job_id"] for n, d in again_docs.items()} == jobs
    assert {n: _engine_pids(d) for n, d in again_docs.items()} == pids
    assert json.loads(restarted.stdout)["gateway"]["pid"] == first["gateway"]["pid"]
    events = scepsy(state, "events").stdout
    n_jobs = sum(len(d["job_ids"]) for d in again_docs.values())
    assert n_jobs >= 2 and f"adopting {n_jobs} job(s)" in events and "adopted the gateway" in events

    agents = [json.loads(p.read_text())["pid"] for p in state.glob("deployments/*/agents/*.json")]
    down = scepsy(state, "down", "--all")
    assert down.returncode == 0, down.stderr
    for n in ("alpha", "beta"):
        assert status(state, n)["state"] == "stopped"
    stop = scepsy(state, "daemon", "stop", "--all")
    assert stop.returncode == 0, stop.stderr
    left = [p for d in pids.values() for p in d.values()] + agents + [json.loads(restarted.stdout)["pid"],
                                                                      first["gateway"]["pid"]]
    assert [p for p in left if alive(p)] == []
    assert [p for p in (int(j.split("-")[1]) for j in jobs.values()) if alive(p)] == []


def test_a_killed_node_agent_degrades_within_a_poll_then_its_node_is_placed_anew_and_down_stops_everything(
        tmp_path: Path, state: Path, sv: Any) -> None:
    scepsy, wait_state, small_plan, alive = sv.scepsy, sv.wait_state, sv.small_plan, sv.alive
    assert scepsy(state, "daemon", "start", "--poll", POLL).returncode == 0
    up = scepsy(state, "up", str(small_plan(tmp_path / "p.yaml")), "--name", "solo", "--detach", "--time-scale", "0.05")
    assert up.returncode == 0, up.stderr
    doc = wait_state(state, "solo", "serving")
    (report_path,) = (state / "deployments" / "solo" / "jobs").glob("*/agents/node2.json")   # node2's job: one per node
    report = json.loads(report_path.read_text())
    on_n2 = {i["pid"] for i in report["instances"]}
    n2_job = report["job_id"] or next(i["job_id"] for i in doc["instances"] if i["pid"] in on_n2)
    os.kill(report["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    after = wait_state(state, "solo", "degraded", timeout_s=10)
    assert time.monotonic() - t0 < 3 * float(POLL) + 2.0
    short = {k: v for k, v in after["continuity"]["capacity"].items() if v["now"] < v["plan"]}
    assert short and all(i["pid"] not in on_n2 for i in after["instances"] if i["routed"])
    again = wait_state(state, "solo", "serving", timeout_s=60, check=lambda d: n2_job not in
                       {i["job_id"] for i in d["instances"]} and len(d["instances"]) == len(doc["instances"]))
    assert all(c["now"] == c["plan"] for c in again["continuity"]["capacity"].values())
    assert "placing node node2's engines anew" in scepsy(state, "events", "solo").stdout
    down = scepsy(state, "down", "solo")
    assert down.returncode == 0, down.stderr
    assert [p for p in (i["pid"] for i in doc["instances"] + again["instances"]) if alive(p)] == []


def test_up_follows_the_deployment_and_ctrl_c_stops_it(tmp_path: Path, state: Path, sv: Any) -> None:
    status, small_plan = sv.status, sv.small_plan
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "scepsy_hpc.cli", "up", str(small_plan(tmp_path / "p.yaml")),
                             "--name", "fg", "--time-scale", "0.05", "--state-dir", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("serving fg:"), line + (proc.stderr.read() if proc.stderr else "")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert status(state, "fg")["state"] == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("args, code, said", [
    (("status", "nope"), 2, "no deployment 'nope'"),
    (("down", "nope"), 2, "no deployment 'nope'"),
    (("logs", "nope"), 2, "no deployment 'nope'"),
])
def test_an_unknown_deployment_is_named_with_the_ones_there_are(state: Path, sv: Any, args: tuple[str, ...], code: int,
                                                                said: str) -> None:
    scepsy = sv.scepsy
    assert scepsy(state, "daemon", "start").returncode == 0
    done = scepsy(state, *args)
    assert done.returncode == code and said in done.stderr and "deployments: none" in done.stderr, done.stderr


def test_a_dead_gateway_is_restarted_on_the_same_port(state: Path, sv: Any) -> None:
    import urllib.request

    started = sv.scepsy(state, "daemon", "start", "--poll", POLL, "--json")
    assert started.returncode == 0, started.stderr
    gw = json.loads(started.stdout)["gateway"]
    os.kill(gw["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    now = gw
    while time.monotonic() < deadline:
        now = json.loads(sv.scepsy(state, "daemon", "status", "--json").stdout)["gateway"]
        if now["pid"] != gw["pid"] and now["alive"]:
            break
        time.sleep(0.2)
    assert now["pid"] != gw["pid"] and now["url"] == gw["url"]
    with urllib.request.urlopen(f"{gw['url']}/health", timeout=5) as resp:
        assert resp.status == 200
    assert "restarted the gateway" in sv.scepsy(state, "events").stdout


def test_up_following_a_deployment_says_it_keeps_serving_when_the_daemon_dies(tmp_path: Path, state: Path,
                                                                              sv: Any) -> None:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "scepsy_hpc.cli", "up", str(sv.small_plan(tmp_path / "p.yaml")),
                             "--name", "fol", "--time-scale", "0.05", "--state-dir", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("serving fol:"), line + (proc.stderr.read() if proc.stderr else "")
        pid = int((state / "daemon.lock").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        assert "fol keeps serving" in (proc.stderr.read() if proc.stderr else "")
        assert sv.scepsy(state, "daemon", "start").returncode == 0
        assert sv.status(state, "fol")["state"] == "serving"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_an_engine_killed_under_a_deployment_is_restarted_and_it_serves_again(tmp_path: Path, state: Path,
                                                                               sv: Any) -> None:
    assert sv.scepsy(state, "daemon", "start", "--poll", POLL).returncode == 0
    up = sv.scepsy(state, "up", str(sv.small_plan(tmp_path / "p.yaml")), "--name", "rs", "--detach", "--time-scale", "0.05")
    assert up.returncode == 0, up.stderr
    doc = sv.wait_state(state, "rs", "serving")
    gen = next(i for i in doc["instances"] if i["llm"] == "generator")
    os.killpg(gen["pid"], signal.SIGKILL)
    again = sv.wait_state(state, "rs", "serving", timeout_s=30,
                          check=lambda d: any(i["llm"] == "generator" and i["restarts"] == 1 for i in d["instances"]))
    back = next(i for i in again["instances"] if i["llm"] == "generator")
    assert back["pid"] != gen["pid"] and back["url"] == gen["url"] and back["healthy"]
    assert _chat(f"{again['gateway_url']}/d/rs/v1", "generator", sv.owner_key(state, "rs"))
    events = sv.scepsy(state, "events", "rs").stdout
    assert "serving → degraded" in events and "degraded → serving" in events


def test_a_job_cancelled_from_outside_is_resubmitted_until_the_breaker_opens(tmp_path: Path, state: Path,
                                                                              sv: Any) -> None:
    from scepsy_hpc.backend.local import LocalBackend

    assert sv.scepsy(state, "daemon", "start", "--poll", POLL).returncode == 0
    up = sv.scepsy(state, "up", str(sv.small_plan(tmp_path / "p.yaml")), "--name", "rb", "--detach", "--time-scale", "0.05",
                   "--max-resubmits", "1")
    assert up.returncode == 0, up.stderr
    first = sv.wait_state(state, "rb", "serving")
    outside = LocalBackend(state / ".local-jobs")
    outside.cancel(first["job_id"], grace_s=2.0)           # as an admin's scancel would
    second = sv.wait_state(state, "rb", "serving", timeout_s=60, check=lambda d: d["job_id"] != first["job_id"])
    assert len(first["job_ids"]) == 2 and second["job_ids"] == first["job_ids"] + [second["job_id"]]   # a job per node
    assert _chat(f"{second['gateway_url']}/d/rb/v1", "generator", sv.owner_key(state, "rb"))
    outside.cancel(second["job_id"], grace_s=2.0)
    failed = sv.wait_state(state, "rb", "failed", timeout_s=60)
    assert "circuit breaker open after 1 resubmission(s)" in failed["error"], failed["error"]
    events = sv.scepsy(state, "events", "rb").stdout
    assert "resubmit: job" in events and "breaker-open" in events
    assert len(failed["job_ids"]) == 3
    deadline = time.monotonic() + 30   # the breaker failed the deployment: the job still serving is cancelled too
    while any(outside.status(j).active for j in failed["job_ids"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(outside.status(j).active for j in failed["job_ids"])
