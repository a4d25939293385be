"""`scepsy up/status/ls/logs/drive/down` as clients of the daemon, with the local backend, and their refusals."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCEPSY = [sys.executable, "-m", "scepsy_hpc.cli"]


def scepsy(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SCEPSY, *args], capture_output=True, text=True, timeout=timeout_s)


def _small_plan(tmp_path: Path) -> Path:
    """rag_rerank on two 'nodes': generator tp=4 on node1; rewriter and reranker sharing GPU 0 of node2 (fractions)."""
    plan = {"workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 5},
            "allocation": {"generator": {"tp": 4}, "rewriter": {"gpu_frac": 0.5}, "reranker": {"gpu_frac": 0.5}},
            "placement": [
                {"llm": "generator", "replica": 0, "node": "node1", "gpus": [0, 1, 2, 3], "port": 18100},
                {"llm": "rewriter", "replica": 0, "node": "node2", "gpus": [0], "port": 18101},
                {"llm": "reranker", "replica": 0, "node": "node2", "gpus": [0], "port": 18102}]}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def _stop(state: Path) -> None:
    scepsy("daemon", "stop", "--all", "--state-dir", str(state), timeout_s=180)


def test_up_serves_the_placement_status_logs_drive_and_down(tmp_path: Path) -> None:
    state = tmp_path / "state"
    try:
        up = scepsy("up", str(_small_plan(tmp_path)), "--time-scale", "0.02", "--name", "demo", "--detach",
                    "--state-dir", str(state))
        assert up.returncode == 0, up.stderr
        assert "demo: pending" in up.stdout or "demo: starting" in up.stdout, up.stdout
        done = None
        for _ in range(300):
            done = scepsy("status", "demo", "--state-dir", str(state), "--json")
            if json.loads(done.stdout)["state"] == "serving":
                break
        assert done is not None and done.returncode == 0, done.stdout + done.stderr
        s = json.loads(done.stdout)
        assert s["backend"] == "local" and s["job_id"].startswith("local-") and s["daemon_pid"] > 0
        got = {(i["llm"], i["node"], tuple(i["gpus"]), i["healthy"]) for i in s["instances"]}
        assert got == {("generator", "node1", (0, 1, 2, 3), True), ("rewriter", "node2", (0,), True),
                       ("reranker", "node2", (0,), True)}
        # co-located engines started one after another: the second spawned after the first was healthy
        (report_path,) = (state / "deployments" / "demo" / "jobs").glob("*/agents/node2.json")   # one job per node
        report = json.loads(report_path.read_text())
        first, second = sorted(report["instances"], key=lambda i: i["started_at"])
        assert second["started_at"] >= first["healthy_at"] > first["started_at"]
        ls = json.loads(scepsy("ls", "--json", "--state-dir", str(state)).stdout)
        assert [d["name"] for d in ls["deployments"]] == ["demo"]
        logs = scepsy("logs", "demo", "--llm", "generator", "--state-dir", str(state))
        assert logs.returncode == 0 and "engine-generator-0.log" in logs.stdout, logs.stderr
        drive = scepsy("drive", "demo", "--state-dir", str(state), "--requests", "6", "--json")
        assert drive.returncode == 0, drive.stderr
        assert json.loads(drive.stdout)["ok"] == 6
        down = scepsy("down", "demo", "--state-dir", str(state))
        assert down.returncode == 0, down.stderr
        for pid in (i["pid"] for i in s["instances"]):   # every engine is gone
            assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] == "Z"
        after = json.loads(scepsy("status", "demo", "--state-dir", str(state), "--json").stdout)
        assert after["state"] == "stopped" and after["job_state"] == "CANCELLED"
        assert not any(i["healthy"] for i in after["instances"])
    finally:
        _stop(state)


def test_an_engine_that_cannot_start_fails_the_deployment_naming_its_log(tmp_path: Path) -> None:
    state = tmp_path / "s"
    try:
        done = scepsy("up", str(_small_plan(tmp_path)), "--name", "bad", "--engine-arg=--bogus", "--state-dir", str(state))
        assert done.returncode == 1, done.stdout + done.stderr
        logs = re.findall(r"see (/\S+\.log)", done.stderr)
        assert logs, done.stderr
        assert "unrecognized arguments: --bogus" in Path(logs[0]).read_text()
        info = json.loads(scepsy("status", "bad", "--json", "--state-dir", str(state)).stdout)
        assert info["state"] == "failed" and "exited with code 2 while starting" in info["error"]
    finally:
        _stop(state)


def test_up_refuses_a_hostile_deployment_name_before_starting_anything(tmp_path: Path) -> None:
    done = scepsy("up", str(_small_plan(tmp_path)), "--name", "x; rm -rf ~", "--state-dir", str(tmp_path / "s"))
    assert done.returncode == 2
    assert "deployment name 'x; rm -rf ~'" in done.stderr
    assert not (tmp_path / "s").exists()


def test_status_without_a_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    done = scepsy("status", "--state-dir", str(tmp_path))
    assert done.returncode == 1
    assert "no scepsy daemon runs" in done.stderr and "scepsy daemon start" in done.stderr


@pytest.mark.parametrize("flag, value, said", [
    ("--cutover-margin", "1e9", "up --cutover-margin 1000000000.0: Input should be less than or equal to 86400"),
    ("--drain-grace", "inf", "argument --drain-grace: inf: give a number ≥ 0"),
    ("--stall-timeout", "-1", "argument --stall-timeout: -1: give a number ≥ 0"),
])
def test_a_continuity_option_out_of_range_names_the_flag_before_any_daemon_starts(
        tmp_path: Path, flag: str, value: str, said: str) -> None:
    state = tmp_path / "state"
    done = subprocess.run([*SCEPSY, "up", "rag_rerank", flag, value, "--state-dir", str(state)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (state / "daemon.sock").exists()
