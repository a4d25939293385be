"""`scepsy plan` and `scepsy bench` as a user runs them (real subprocesses)."""

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
    return str(Path(__file__).resolve().parents[1] / "data" / "small_rag.yaml")


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


def test_bench_runs_and_plots(small, tmp_path):
    png = tmp_path / "b.png"
    out = scepsy("bench", "--workflows", small, "--gpus", "2", "--requests", "120", "--policies", "milp,equal",
                 "--samples", "200", "--plot", str(png), "--json", timeout=600)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    cell = d["cells"][0]
    assert cell["gpus"] == 2 and set(cell["policies"]) == {"milp", "equal"}
    m, e = cell["policies"]["milp"], cell["policies"]["equal"]
    assert m["sim_max_rps"] > 0 and e["sim_max_rps"] > 0
    assert m["milp_throughput_ratio"] == pytest.approx(1.0)
    assert e["milp_throughput_ratio"] == pytest.approx(m["sim_max_rps"] / e["sim_max_rps"])
    assert cell["common_rps"] == pytest.approx(0.9 * min(m["sim_max_rps"], e["sim_max_rps"]))
    # the bisection brackets each capacity; every run took at least the requests asked for
    assert m["sim_refused_rps"] > m["sim_max_rps"] and e["sim_refused_rps"] > e["sim_max_rps"]
    assert all(len(r) == 5 and r[4] >= 120 for r in m["capacity_runs"]) and m["capacity_max_requests"] >= 120
    assert cell["common_requests"] == max(m["capacity_max_requests"], e["capacity_max_requests"])
    assert 0 < cell["milp_fluid_fraction"] <= 1.05
    # the instance bound sits between milp's exact optimum (one configuration per LLM) and the fluid bound
    assert m["predicted_max_rps"] <= cell["instance_bound_rps"] * (1 + 1e-6) <= cell["fluid_rps"] * (1 + 1e-6)
    assert cell["milp_instance_fraction"] == pytest.approx(m["sim_max_rps"] / cell["instance_bound_rps"])
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_bench_table_piped_keeps_every_column_whole(capsys):
    """Piped (not a terminal), the bench table is printed wide: no column is clipped, the bounds included."""
    import argparse

    from scepsy_hpc.commands import bench

    alloc = "qwen72:2xtp8 llama70:2xtp4 mixtral:1xtp4 qwen32:1xtp4"
    pol = {"allocation": alloc, "predicted_max_rps": 3.67, "sim_max_rps": 3.43, "sim_refused_rps": 3.5,
           "milp_throughput_ratio": 1.0, "capacity_max_requests": 4800, "latency_mean_s": 31.6, "latency_p99_s": 80.2,
           "latency_ratio_vs_milp": 1.0}
    row = {"workflow": "mixture_of_agents", "gpus": 32, "fluid_rps": 4.46, "instance_bound_rps": 3.67, "common_rps": 0.298,
           "milp_fluid_fraction": 0.77, "milp_instance_fraction": 0.935, "policies": {"milp": pol}}
    bench._print([row], argparse.Namespace(gpu_type="h100-sxm", requests=1200, seed=0), 10.0)
    out = capsys.readouterr().out
    for text in ("inst. bound", "milp/inst.", "94%", "77%", "max-throughput allocation", alloc, "mixture_of_agents"):
        assert text in out
    assert "…" not in out
