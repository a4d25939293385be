"""End to end on the real local Slurm: trace → profile arrays → plan → the daemon serving deployments → drive →
status → kill -9 of the daemon and adoption → down, and failures.

Every step is the `scepsy` command a site user types. The cluster is scripts/slurm-local.sh's (node1..4, 4 fake
H100s each); these tests assume they have it to themselves.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

SCEPSY = [sys.executable, "-m", "scepsy_hpc.cli"]
TIME_SCALE = "0.05"


def scepsy(*args: str, timeout_s: float = 300.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `scepsy ARGS`; with `check`, fail the test (showing stderr) on a non-zero exit."""
    done = subprocess.run([*SCEPSY, *args], capture_output=True, text=True, timeout=timeout_s)
    if check:
        assert done.returncode == 0, f"scepsy {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def _squeue(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T"], capture_output=True, text=True).stdout.strip()


def _jobs_submitted() -> set[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-a", "-S", "now-1hour", "-o", "JobID"], capture_output=True,
                         text=True).stdout
    return {ln.strip() for ln in out.splitlines() if ln.strip()}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().split("=", 1) for x in raw if b"=" in x)


@pytest.fixture(scope="module")
def served_plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """trace → profile as array jobs → plan --cluster: the inputs of the serving tests."""
    work = tmp_path_factory.mktemp("e2e")
    trace, profiles, plan = work / "rag.trace.jsonl", work / "profiles", work / "plan.yaml"
    scepsy("trace", "rag_rerank", "--requests", "12", "--time-scale", "0.02", "-o", str(trace))
    before = _jobs_submitted()
    out = scepsy("profile", "rag_rerank", "--trace", str(trace), "--backend", "slurm", "--engine", "sim", "--tp", "1,4",
                 "--gpu-frac", "1", "--calls", "60", "--fractions", "0.5,0.9", "-o", str(profiles), "--json", timeout_s=900)
    report = json.loads(out.stdout)
    assert report["failed"] == [] and len(report["profiled"]) == 5   # generator fits at tp=4 only
    arrays = {t.split("_")[0] for t in _jobs_submitted() - before}
    assert len(arrays) == 2, f"one array per tp degree expected, sacct shows {sorted(_jobs_submitted() - before)}"
    for array in arrays:   # visible in sacct as an array: ID_0, ID_1, … all COMPLETED
        rows = subprocess.run(["sacct", "-n", "-X", "-P", "-j", array, "-o", "JobID,State"], capture_output=True,
                              text=True).stdout.split()
        assert rows and all("_" in r.split("|")[0] and r.endswith("|COMPLETED") for r in rows), rows
    for row in report["profiled"]:
        assert row["source"] == "measured" and Path(row["path"]).exists()
    # a rerun skips what is measured
    again = json.loads(scepsy("profile", "rag_rerank", "--trace", str(trace), "--backend", "slurm", "--tp", "1,4",
                              "--gpu-frac", "1", "-o", str(profiles), "--json").stdout)
    assert again["profiled"] == [] and sum("already profiled" in s["why"] for s in again["skipped"]) == 5
    scepsy("plan", "rag_rerank", "--cluster", str(ROOT / "configs" / "clusters" / "local.yaml"), "--profiles", str(profiles),
           "--trace", str(trace), "--target-rps", "0.5", "-o", str(plan))
    return {"plan": plan, "work": work}


def _state_cmd(state: Path, *args: str, check: bool = True, timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
    return scepsy(*args, "--state-dir", str(state), check=check, timeout_s=timeout_s)


def _status(state: Path, name: str) -> dict[str, Any]:
    return json.loads(_state_cmd(state, "status", name, "--json", check=False).stdout)


def _wait(state: Path, name: str, want: tuple[str, ...], timeout_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = _status(state, name)
        if doc.get("state") in want:
            return doc
        time.sleep(0.5)
    events = _state_cmd(state, "events", name, check=False).stdout
    pytest.fail(f"{name} not {want} after {timeout_s} s: {json.dumps(doc)[:1500]}\n{events[-3000:]}")


def _hand_plan(out: Path, nodes: tuple[str, str]) -> Path:
    """rag_rerank on two nodes: the generator at tp=4 on the first, the other two sharing GPU 1 of the second."""
    a, b = nodes
    data = {"workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 5},
            "allocation": {"generator": {"tp": 4}, "rewriter": {"gpu_frac": 0.5}, "reranker": {"gpu_frac": 0.5}},
            "placement": [{"llm": "generator", "replica": 0, "node": a, "gpus": [0, 1, 2, 3]},
                          {"llm": "rewriter", "replica": 0, "node": b, "gpus": [1]},
                          {"llm": "reranker", "replica": 0, "node": b, "gpus": [1]}]}
    out.write_text(yaml.safe_dump(data))
    return out


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    """A daemon on a fresh state dir (poll 1 s); at the end every deployment and the gateway are stopped."""
    state = tmp_path / "state"
    _state_cmd(state, "daemon", "start", "--poll", "1")
    yield state
    _state_cmd(state, "daemon", "stop", "--all", check=False, timeout_s=240)


def test_two_deployments_on_slurm_survive_a_daemon_kill9_and_down_all_leaves_no_job(tmp_path: Path, daemon: Path) -> None:
    import threading

    from openai import OpenAI

    state = daemon
    plans = {"e2e": _hand_plan(tmp_path / "e2e.yaml", ("node1", "node2")),
             "e2f": _hand_plan(tmp_path / "e2f.yaml", ("node3", "node4"))}
    for name, p in plans.items():
        _state_cmd(state, "up", str(p), "--backend", "slurm", "--time-scale", TIME_SCALE, "--name", name, "--detach")
    docs = {n: _wait(state, n, ("serving",)) for n in ("e2e", "e2f")}
    for name, doc in docs.items():
        assert len(doc["job_ids"]) == 2   # one job per node of the plan
        for job_id in doc["job_ids"]:
            assert "RUNNING" in _squeue(job_id)
        # each job's submission script (submitit's), linked beside the job's logs under the job's name
        scripts = sorted((state / "deployments" / name / "jobs").glob("*/logs/scepsy-*.sh"))
        assert len(scripts) == 2 and all("#SBATCH" in p.read_text() and "--no-requeue" in p.read_text() for p in scripts)
        planned = {(p["llm"], p["replica"]): p for p in yaml.safe_load((Path(doc["plan"])).read_text())["placement"]}
        got = {(i["llm"], i["replica"]): i for i in doc["instances"]}
        assert got.keys() == planned.keys()
        for key, inst in got.items():
            assert inst["healthy"], inst
            # a node's job holds as many GPUs as its engines use; Slurm picks which, and the agent maps onto them
            assert (inst["node"], len(inst["gpus"])) == (planned[key]["node"], len(planned[key]["gpus"]))
            env = _environ(inst["pid"])   # the engine really runs in the job, with the GPUs the job holds
            assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, inst["gpus"]))
            assert env["SLURM_JOB_ID"] == inst["job_id"] and env["SLURMD_NODENAME"] == planned[key]["node"]
        key = _state_cmd(state, "keys", "show", name).stdout.strip()   # the owner key `up` made
        assert key.startswith("sk-scepsy-")
        client = OpenAI(base_url=doc["base_url"], api_key=key, max_retries=0, timeout=60)
        out = client.chat.completions.create(model="generator", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert out.choices[0].message.content is not None

    logs = _state_cmd(state, "logs", "e2e").stdout   # each node's task output, through submitit's handle on the job
    assert "submitit" in logs and all(f"{j}_0_log.out" in logs for j in docs["e2e"]["job_ids"]), logs[:2000]
    drive = json.loads(_state_cmd(state, "drive", "e2e", "--requests", "8", "--json").stdout)   # the trace's workflow
    assert (drive["requests"], drive["ok"], drive["errors"]) == (8, 8, 0)

    pid = json.loads(_state_cmd(state, "daemon", "status", "--json").stdout)["pid"]
    failures: list[str] = []
    sent = [0]
    stop = threading.Event()
    e2f_key = _state_cmd(state, "keys", "show", "e2f").stdout.strip()

    def load() -> None:
        c = OpenAI(base_url=docs["e2f"]["gateway_url"] + "/v1", api_key=e2f_key, max_retries=0, timeout=60)
        while not stop.is_set():
            try:
                c.chat.completions.create(model="e2f/reranker", messages=[{"role": "user", "content": "x"}], max_tokens=2)
                sent[0] += 1
            except Exception as exc:   # every failure is the finding
                failures.append(str(exc))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        subprocess.run(["kill", "-9", str(pid)], check=True)
        time.sleep(2.0)
        _state_cmd(state, "daemon", "start", "--poll", "1")
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert failures == [] and sent[0] > 0
    again = {n: _wait(state, n, ("serving",)) for n in ("e2e", "e2f")}
    for n in ("e2e", "e2f"):
        assert again[n]["job_ids"] == docs[n]["job_ids"]
        assert {(i["llm"], i["replica"]): i["pid"] for i in again[n]["instances"]} == \
               {(i["llm"], i["replica"]): i["pid"] for i in docs[n]["instances"]}

    _state_cmd(state, "down", "--all")
    for n in ("e2e", "e2f"):
        assert all(_squeue(j) == "" for j in docs[n]["job_ids"])
        assert _status(state, n)["state"] == "stopped"
        for inst in docs[n]["instances"]:
            assert not Path(f"/proc/{inst['pid']}").exists()


def test_an_engine_that_fails_to_start_fails_the_deployment_naming_its_log_and_the_job_is_cancelled(
        served_plan: dict[str, Path], daemon: Path) -> None:
    _state_cmd(daemon, "up", str(served_plan["plan"]), "--backend", "slurm", "--name", "broken", "--detach",
               "--engine-arg=--no-such-flag")
    doc = _wait(daemon, "broken", ("failed",))
    assert "exited with code 2 while starting" in doc["error"], doc["error"]
    logs = re.findall(r"see (/\S+\.log)", doc["error"])
    assert logs and "unrecognized arguments: --no-such-flag" in Path(logs[0]).read_text()
    deadline = time.monotonic() + 60
    while any(_squeue(j) for j in doc["job_ids"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [j for j in doc["job_ids"] if _squeue(j)] == []


def test_a_partition_that_does_not_exist_is_refused_before_anything_is_submitted(served_plan: dict[str, Path],
                                                                                 daemon: Path) -> None:
    before = _jobs_submitted()
    done = _state_cmd(daemon, "up", str(served_plan["plan"]), "--backend", "slurm", "--partition", "nope", "--name",
                      "nopart", "--detach", check=False)
    assert done.returncode == 1
    assert "partition 'nope' does not exist on this cluster (it has gpu)" in done.stderr
    assert _jobs_submitted() == before
    assert "no deployment 'nopart'" in _state_cmd(daemon, "status", "nopart", check=False).stderr


def test_more_gpus_than_the_partition_has_is_refused_before_anything_is_submitted(tmp_path: Path, daemon: Path) -> None:
    placement = [{"llm": "generator", "replica": r, "node": f"node{r + 1}", "gpus": [0, 1, 2, 3], "gpu_frac": 1.0,
                  "mem_frac": 0.9, "mps_pct": 100, "port": 8100} for r in range(5)]
    placement += [{"llm": m, "replica": 0, "node": "node6", "gpus": [k], "gpu_frac": 1.0, "mem_frac": 0.9, "mps_pct": 100,
                   "port": 8100 + k} for k, m in enumerate(("rewriter", "reranker"))]
    plan = {"workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 22},
            "allocation": {"generator": {"tp": 4, "replicas": 5}, "rewriter": {"tp": 1}, "reranker": {"tp": 1}},
            "placement": placement}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(plan))
    before = _jobs_submitted()
    done = _state_cmd(daemon, "up", str(path), "--backend", "slurm", "--name", "big", "--detach", check=False)
    assert done.returncode == 3, done.stderr
    assert "the plan needs 22 GPUs; partition 'gpu' has 16 (4 node(s))" in done.stderr
    assert "nothing was submitted" in done.stderr
    assert _jobs_submitted() == before


def test_a_job_cancelled_from_outside_is_resubmitted_then_the_breaker_fails_it_with_slurms_reason(
        served_plan: dict[str, Path], daemon: Path) -> None:
    _state_cmd(daemon, "up", str(served_plan["plan"]), "--backend", "slurm", "--time-scale", TIME_SCALE, "--name", "victim",
               "--detach", "--max-resubmits", "1")
    first = _wait(daemon, "victim", ("serving",))["job_id"]
    t0 = time.monotonic()
    subprocess.run(["scancel", first], check=True)
    deadline = time.monotonic() + 180
    doc = _status(daemon, "victim")
    while not (doc.get("state") == "serving" and doc.get("job_id") != first) and time.monotonic() < deadline:
        time.sleep(0.5)
        doc = _status(daemon, "victim")
    assert doc["state"] == "serving" and doc["job_id"] != first, doc
    print(f"outside scancel → serving again in job {doc['job_id']} after {time.monotonic() - t0:.1f} s")
    assert _squeue(first) == ""
    events = _state_cmd(daemon, "events", "victim").stdout
    assert f"job {first} ended: CANCELLED" in events and "engines anew on" in events and "(1 of at most 1" in events
    t0 = time.monotonic()
    subprocess.run(["scancel", doc["job_id"]], check=True)
    failed = _wait(daemon, "victim", ("failed",), timeout_s=60)
    assert time.monotonic() - t0 < 20
    assert f"job {doc['job_id']} ended: CANCELLED" in failed["error"] and "circuit breaker open" in failed["error"]
    assert not any(i["healthy"] for i in failed["instances"])


def test_a_recycled_job_id_in_the_state_is_not_adopted(tmp_path: Path) -> None:
    """The state names our job by an id Slurm now gives to another job: the daemon must not take (or cancel) it."""
    from scepsy_hpc.service.state import Deployment, Job, StateStore

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    other = subprocess.run(["sbatch", "--parsable", "-J", "someone-else", "-p", "gpu", "-o", "/dev/null", "--wrap", "sleep 300"],
                           capture_output=True, text=True, check=True).stdout.strip()
    try:
        with StateStore(state / "state.db") as store:
            store.add_deployment(Deployment(name="old", state="serving", session_dir=str(state / "deployments" / "old")))
            store.add_job(Job(job_id=other, deployment="old", backend="slurm", name="scepsy-old-abc123",
                              submit_time="2026-01-01T00:00:00", state="RUNNING", created=time.time() - 3600))
        _state_cmd(state, "daemon", "start", "--poll", "1")
        doc = _wait(state, "old", ("failed",), timeout_s=30)
        assert f"job id {other} now belongs to another job (someone-else" in doc["error"], doc["error"]
        assert "not ours, not adopted" in doc["error"]
        assert "RUNNING" in _squeue(other) or "PENDING" in _squeue(other)   # left alone
    finally:
        _state_cmd(state, "daemon", "stop", "--all", check=False)
        subprocess.run(["scancel", other], check=False)


def test_a_failed_profiling_task_is_named_with_its_log_files(tmp_path: Path) -> None:
    # vLLM is not installed on the local cluster's nodes: the task fails, and says so in its log
    done = scepsy("profile", "rag_rerank", "--backend", "slurm", "--engine", "vllm", "--tp", "1", "--gpu-frac", "1",
                  "--llms", "reranker", "-o", str(tmp_path / "p"), "--json", check=False)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["profiled"] == [] and len(report["failed"]) == 1
    failed = report["failed"][0]
    assert (failed["llm"], failed["tp"], failed["state"]) == ("reranker", 1, "FAILED")
    assert "`vllm` is not installed on node" in Path(failed["stderr"]).read_text()
