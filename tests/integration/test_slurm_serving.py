"""End to end on the real local Slurm: trace → profile arrays → plan → up → drive → status → down, and failures.

Every step is the `scepsy` command a site user types. The cluster is scripts/slurm-local.sh's (node1..4, 4 fake
H100s each); these tests assume they have it to themselves.
"""

from __future__ import annotations

import json
import re
import signal
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


def _start_up(*args: str, log: Path) -> subprocess.Popen[str]:
    out = open(log, "w")
    return subprocess.Popen([*SCEPSY, "up", *args], stdout=out, stderr=subprocess.STDOUT, text=True)


def _wait_serving(state_dir: Path, name: str, proc: subprocess.Popen[str], log: Path, timeout_s: float = 180.0) -> dict[str, Any]:
    info_path = state_dir / name / "session.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"scepsy up exited {proc.returncode} before serving:\n{log.read_text()[-3000:]}")
        if info_path.exists():
            info = json.loads(info_path.read_text())
            if info.get("state") == "serving":
                return info
        time.sleep(0.5)
    proc.terminate()
    pytest.fail(f"not serving after {timeout_s} s:\n{log.read_text()[-3000:]}")


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


def test_up_slurm_serves_the_plan_through_the_gateway_then_down_leaves_no_job(served_plan: dict[str, Path]) -> None:
    state, plan = served_plan["work"] / "state", served_plan["plan"]
    log = served_plan["work"] / "up.log"
    proc = _start_up(str(plan), "--backend", "slurm", "--engine", "sim", "--time-scale", TIME_SCALE, "--name", "e2e",
                     "--state-dir", str(state), log=log)
    try:
        info = _wait_serving(state, "e2e", proc, log)
        job_id = info["job_id"]
        assert "RUNNING" in _squeue(job_id)
        assert (state / "e2e" / "logs" / "scepsy-e2e.sh").read_text().startswith("#!/bin/bash")   # kept beside the logs

        drive = json.loads(scepsy("drive", "e2e", "--state-dir", str(state), "--requests", "12", "--json").stdout)
        assert (drive["requests"], drive["ok"], drive["errors"]) == (12, 12, 0)
        calls = [json.loads(ln) for ln in (state / "e2e" / "trace.jsonl").read_text().splitlines() if ln.strip()]
        assert {c.get("llm") for c in calls if c.get("kind", "call") == "call"} >= {"rewriter", "generator", "reranker"}

        status = json.loads(scepsy("status", "e2e", "--state-dir", str(state), "--json").stdout)
        assert status["job_id"] == job_id and status["job_state"] == "RUNNING" and status["gateway_healthy"]
        planned = {(p["llm"], p["replica"]): p for p in yaml.safe_load(plan.read_text())["placement"]}
        got = {(i["llm"], i["replica"]): i for i in status["instances"]}
        assert got.keys() == planned.keys()
        for key, inst in got.items():
            assert inst["healthy"], inst
            assert (inst["node"], inst["gpus"]) == (planned[key]["node"], planned[key]["gpus"])
            # the engine process really runs with the placement's GPUs
            env = _environ(inst["pid"])
            assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, planned[key]["gpus"]))
            assert env["SLURM_JOB_ID"] == job_id and env["SLURMD_NODENAME"] == planned[key]["node"]

        scepsy("down", "e2e", "--state-dir", str(state))
        assert _squeue(job_id) == ""
        assert proc.wait(timeout=30) == 0
        after = json.loads(scepsy("status", "e2e", "--state-dir", str(state), "--json", check=False).stdout)
        assert after["state"] == "down" and after["job_state"] == "CANCELLED"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)


def test_an_engine_that_fails_to_start_is_reported_with_its_log_and_the_job_is_cancelled(served_plan: dict[str, Path]) -> None:
    state = served_plan["work"] / "state-fail"
    done = scepsy("up", str(served_plan["plan"]), "--backend", "slurm", "--engine", "sim", "--name", "broken",
                  "--engine-arg=--no-such-flag", "--state-dir", str(state), check=False, timeout_s=240)
    assert done.returncode == 1
    assert "exited with code 2 while starting" in done.stderr
    logs = re.findall(r"see (/\S+\.log)", done.stderr)
    assert logs, done.stderr
    assert "unrecognized arguments: --no-such-flag" in Path(logs[0]).read_text()
    job_id = json.loads((state / "broken" / "session.json").read_text())["job_id"]
    assert _squeue(job_id) == ""


def test_a_partition_that_does_not_exist_is_refused_before_anything_is_submitted(served_plan: dict[str, Path]) -> None:
    before = _jobs_submitted()
    done = scepsy("up", str(served_plan["plan"]), "--backend", "slurm", "--partition", "nope", "--name", "nopart",
                  "--state-dir", str(served_plan["work"] / "state-np"), check=False)
    assert done.returncode == 1
    assert "partition 'nope' does not exist on this cluster (it has gpu)" in done.stderr
    assert _jobs_submitted() == before


def test_more_gpus_than_the_partition_has_is_refused_before_anything_is_submitted(tmp_path: Path) -> None:
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
    done = scepsy("up", str(path), "--backend", "slurm", "--name", "big", "--state-dir", str(tmp_path / "s"), check=False)
    assert done.returncode == 3, done.stderr
    assert "the plan needs 22 GPUs; partition 'gpu' has 16 (4 node(s))" in done.stderr
    assert "nothing was submitted" in done.stderr
    assert _jobs_submitted() == before


def test_a_job_cancelled_from_outside_ends_up_within_seconds(served_plan: dict[str, Path]) -> None:
    state, log = served_plan["work"] / "state-scancel", served_plan["work"] / "up-scancel.log"
    proc = _start_up(str(served_plan["plan"]), "--backend", "slurm", "--time-scale", TIME_SCALE, "--name", "victim",
                     "--state-dir", str(state), log=log)
    try:
        job_id = _wait_serving(state, "victim", proc, log)["job_id"]
        t0 = time.monotonic()
        subprocess.run(["scancel", job_id], check=True)
        rc = proc.wait(timeout=30)
        noticed_s = time.monotonic() - t0
        assert rc == 1
        assert noticed_s < 10, f"scancel noticed after {noticed_s:.1f} s"
        assert f"job {job_id} ended: CANCELLED" in log.read_text()
        assert json.loads((state / "victim" / "session.json").read_text())["state"] == "ended"
    finally:
        if proc.poll() is None:
            proc.kill()


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
