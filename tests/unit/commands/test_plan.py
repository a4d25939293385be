"""`scepsy plan` as a user runs it (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def scepsy(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def small():
    return str(Path(__file__).resolve().parents[2] / "data" / "small_rag.yaml")


def test_plan_json_and_plan_file_round_trip(small, tmp_path):
    plan = tmp_path / "plan.yaml"
    out = scepsy("plan", small, "--gpus", "4", "--json", "-o", str(plan), "--samples", "300")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    for key in ("status", "allocation", "predicted", "gpus_used", "solve_time_s"):
        assert key in d
    assert d["status"] == "optimal" and d["gpus_used"] <= 4
    assert set(d["allocation"]) == {"rewriter", "reranker", "answer"}
    assert d["predicted"]["rate_rps"] == pytest.approx(4.0)
    assert d["predicted"]["throughput_rps"] > 4.0 and d["predicted"]["latency_s"] > 0
    # the plan file validates and simulates like a hand-written one
    v = scepsy("validate", str(plan))
    assert v.returncode == 0, v.stdout + v.stderr
    sim = scepsy("simulate", small, "--plan", str(plan), "--rate", "4", "--requests", "150", "--json")
    assert sim.returncode == 0, sim.stderr
    res = json.loads(sim.stdout)
    assert res["completed"] == 150
    assert res["latency_mean_s"] == pytest.approx(d["predicted"]["latency_s"], rel=0.35)


def test_plan_human_output_and_simulate(small):
    out = scepsy("plan", small, "--gpus", "4", "--simulate", "--requests", "100", "--samples", "300")
    assert out.returncode == 0, out.stderr
    for needle in ("tp", "repl", "util", "bottleneck", "GPUs:", "free", "status optimal", "simulated 100 requests"):
        assert needle in out.stdout


def test_milp_plan_is_checked_in_the_simulator_unless_told_not_to(small, tmp_path):
    plan = tmp_path / "plan.yaml"
    d = json.loads(scepsy("plan", small, "--gpus", "6", "--json", "--samples", "300", "-o", str(plan)).stdout)
    check = d["sim_check"]
    assert check["time_s"] > 0 and check["allocations"][0]["label"] == "optimum"
    assert len(check["allocations"]) >= 2 and all(a["simulated_latency_s"] > 0 for a in check["allocations"])
    kept = [a for a in check["allocations"] if a["allocation"] == d["allocation"]]
    assert len(kept) == 1 and any(n.startswith("simulator check:") for n in d["notes"])
    assert "sim_check_s" in plan.read_text()
    off = json.loads(scepsy("plan", small, "--gpus", "6", "--json", "--samples", "300", "--no-sim-check").stdout)
    assert off["sim_check"] is None and not any("simulator check" in n for n in off["notes"])
    assert off["allocation"] == check["allocations"][0]["allocation"]  # the MILP's optimum, unchecked


@pytest.mark.parametrize("policy", ["equal", "independent", "paper-enum"])
def test_baseline_policies_write_the_same_format(small, policy):
    out = scepsy("plan", small, "--gpus", "4", "--policy", policy, "--json", "--samples", "300")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["policy"] == policy and d["gpus_used"] <= 4 and set(d["allocation"]) == {"rewriter", "reranker", "answer"}


def test_max_throughput_and_slo_goals(small):
    top = json.loads(scepsy("plan", small, "--gpus", "4", "--max-throughput", "--json", "--samples", "300",
                            "--sim-check-throughput").stdout)
    assert top["goal"] == "max-throughput"
    # planned at 90% of the most capacity any allocation has, less the 3% --throughput-tol
    thr, rate = top["predicted"]["throughput_rps"], top["predicted"]["rate_rps"]
    assert 0.9 * 0.97 * thr * 0.98 <= rate <= 0.9 * thr * 1.02
    assert any("within 3% of that capacity" in n for n in top["notes"])
    # the throughput goal's simulator check: each allocation's highest sustained rate, the optimum first
    rows = top["sim_check"]["allocations"]
    assert rows[0]["label"] == "optimum" and rows[0]["sustained_rps"] > 0
    assert all("sustained_rps" in r and "refused_rps" in r for r in rows)
    assert any("simulator check (throughput)" in n for n in top["notes"])
    slo = json.loads(scepsy("plan", small, "--gpus", "4", "--latency-slo", str(top["predicted"]["latency_s"] * 0.8),
                            "--json", "--samples", "300").stdout)
    assert slo["predicted"]["latency_s"] <= top["predicted"]["latency_s"] * 0.8
    assert slo["predicted"]["rate_rps"] < top["predicted"]["rate_rps"]


@pytest.mark.parametrize("args,needle,code", [
    (["--gpus", "1", "--target-rps", "50"], "1 h100-sxm given", 3),
    (["--target-rps", "2"], "--gpus N", 2),
    (["--gpus", "4", "--gpu-type", "h100"], "unknown GPU type", 2),
    (["--gpus", "4", "--target-rps", "x"], "not a number", 2),
    (["--cluster", "local", "--gpu-type", "a100-sxm"], "has no such GPUs", 2),
    (["--gpus", "4", "--max-throughput", "--throughput-tol", "0.7"], "--throughput-tol 0.7: give a fraction", 2),
])
def test_plan_errors_are_clear(small, args, needle, code):
    out = scepsy("plan", small, *args, "--samples", "200")
    assert out.returncode == code, out.stdout + out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr


def test_plan_on_a_cluster_spec_caps_tp_at_its_nvlink_domain(small):
    out = scepsy("plan", small, "--cluster", "local", "--max-throughput", "--json", "--samples", "300")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["gpus_total"] == 16 and all(a["tp"] <= 4 for a in d["allocation"].values())


def test_the_readme_planning_command_works_as_written():
    """The README's planning-only command (plan, place, simulate on the embedded default) succeeds."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    line = next(l for l in readme.splitlines() if ".venv/bin/scepsy plan deep_research" in l)
    cmd = shlex.split(re.sub(r"^.*\.venv/bin/scepsy ", "", line))
    out = scepsy(*cmd, "--requests", "60")
    assert out.returncode == 0, out.stderr
    assert "status optimal" in out.stdout and "simulated 60 requests" in out.stdout
    assert "placement" in out.stdout and "node1" in out.stdout
    assert "Running HiGHS" not in out.stdout + out.stderr, "the solver's banner leaked into the main command's output"


def test_the_readme_main_command_serves_drives_and_compares_as_written(tmp_path):
    """The README's main command: plan, serve with the daemon, drive the openai-SDK example, measured vs predicted."""
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    line = next(l for l in (root / "README.md").read_text().splitlines() if "&&" in l and "scripts/serve_demo.py" in l)
    script = re.search(r"(scripts/serve_demo\.py.*)$", line).group(1).split()
    env = {**os.environ, "SCEPSY_STATE_DIR": str(tmp_path / "state")}
    out = subprocess.run([sys.executable, str(root / script[0]), *script[1:], "--requests", "20", "--stop"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"latency mean \(s\)\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+", out.stdout), out.stdout
    assert "20/20 requests ok" in out.stdout and "serving after" in out.stdout
    assert "Running HiGHS" not in out.stdout + out.stderr
