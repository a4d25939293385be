"""`scepsy up/status/drive/down` with the local backend: the node agents as processes on this machine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

SCEPSY = [sys.executable, "-m", "scepsy_hpc.cli"]


def scepsy(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SCEPSY, *args], capture_output=True, text=True, timeout=timeout_s)


def _small_plan(tmp_path: Path) -> Path:
    """rag_rerank on two 'nodes': generator tp=4 on n1; rewriter and reranker sharing GPU 0 of n2 (fractions)."""
    plan = {"workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 5},
            "allocation": {"generator": {"tp": 4}, "rewriter": {"gpu_frac": 0.5}, "reranker": {"gpu_frac": 0.5}},
            "placement": [
                {"llm": "generator", "replica": 0, "node": "n1", "gpus": [0, 1, 2, 3], "gpu_frac": 1.0, "mem_frac": 0.9,
                 "mps_pct": 100, "port": 18100},
                {"llm": "rewriter", "replica": 0, "node": "n2", "gpus": [0], "gpu_frac": 0.5, "mem_frac": 0.45,
                 "mps_pct": 50, "port": 18101},
                {"llm": "reranker", "replica": 0, "node": "n2", "gpus": [0], "gpu_frac": 0.5, "mem_frac": 0.45,
                 "mps_pct": 50, "port": 18102}]}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def _wait(state: Path, name: str, proc: subprocess.Popen[str], timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    info_path = state / name / "session.json"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        if info_path.exists() and json.loads(info_path.read_text()).get("state") == "serving":
            return json.loads(info_path.read_text())
        time.sleep(0.3)
    proc.kill()
    pytest.fail("the local session never served")


def test_local_up_serves_the_placement_and_down_stops_every_engine(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen([*SCEPSY, "up", str(_small_plan(tmp_path)), "--time-scale", "0.02", "--name", "demo",
                             "--state-dir", str(state)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        info = _wait(state, "demo", proc)
        assert info["backend"] == "local" and info["job_id"].startswith("local-")
        status = scepsy("status", "--state-dir", str(state), "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        s = json.loads(status.stdout)
        got = {(i["llm"], i["node"], tuple(i["gpus"]), i["cuda_visible_devices"], i["healthy"]) for i in s["instances"]}
        assert got == {("generator", "n1", (0, 1, 2, 3), "0,1,2,3", True), ("rewriter", "n2", (0,), "0", True),
                       ("reranker", "n2", (0,), "0", True)}
        # co-located engines started one after another: the second spawned after the first was healthy
        report = json.loads((state / "demo" / "agents" / "n2.json").read_text())
        assert report["state"] == "ready"
        first, second = sorted(report["instances"], key=lambda i: i["started_at"])
        assert second["started_at"] >= first["healthy_at"] > first["started_at"]
        drive = scepsy("drive", "demo", "--state-dir", str(state), "--requests", "6", "--json")
        assert drive.returncode == 0, drive.stderr
        assert json.loads(drive.stdout)["ok"] == 6
        pids = [i["pid"] for i in s["instances"]]
        down = scepsy("down", "demo", "--state-dir", str(state))
        assert down.returncode == 0, down.stderr
        assert proc.wait(timeout=30) == 0
        for pid in pids:   # every engine is gone (not even a zombie: they were reaped by the agent)
            assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] == "Z"
        after = json.loads(scepsy("status", "demo", "--state-dir", str(state), "--json").stdout)
        assert after["state"] == "down" and after["job_state"] == "CANCELLED" and not after["gateway_healthy"]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_an_engine_that_cannot_start_fails_up_naming_its_log(tmp_path: Path) -> None:
    done = scepsy("up", str(_small_plan(tmp_path)), "--name", "bad", "--engine-arg=--bogus", "--state-dir",
                  str(tmp_path / "s"))
    assert done.returncode == 1
    logs = re.findall(r"see (/\S+\.log)", done.stderr)
    assert logs, done.stderr
    assert "unrecognized arguments: --bogus" in Path(logs[0]).read_text()
    info = json.loads((tmp_path / "s" / "bad" / "session.json").read_text())
    assert info["state"] == "failed"


def test_up_refuses_a_hostile_session_name_before_starting_anything(tmp_path: Path) -> None:
    done = scepsy("up", str(_small_plan(tmp_path)), "--name", "x; rm -rf ~", "--state-dir", str(tmp_path / "s"))
    assert done.returncode == 2
    assert "session name 'x; rm -rf ~'" in done.stderr
    assert not (tmp_path / "s").exists()


def test_status_without_a_session_says_how_to_start_one(tmp_path: Path) -> None:
    done = scepsy("status", "--state-dir", str(tmp_path))
    assert done.returncode == 2
    assert "scepsy up PLAN" in done.stderr
