"""`scepsy bench` as a user runs it (a real subprocess), and its table."""

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


def test_bench_runs_and_plots(small, tmp_path):
    png = tmp_path / "b.png"
    kept = tmp_path / "kept"
    cmd = ("bench", "--workflows", small, "--gpus", "2", "--requests", "120", "--policies", "milp,equal",
           "--samples", "200", "--resume", str(kept), "--json")
    out = scepsy(*cmd, "--plot", str(png), timeout=600)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    cell = d["cells"][0]
    assert cell["gpus"] == 2 and set(cell["policies"]) == {"milp", "equal"}
    m, e = cell["policies"]["milp"], cell["policies"]["equal"]
    assert m["sim_max_rps"] > 0 and e["sim_max_rps"] > 0
    assert m["milp_throughput_ratio"] == pytest.approx(1.0)
    assert e["milp_throughput_ratio"] == pytest.approx(m["sim_max_rps"] / e["sim_max_rps"])
    # latency at 90, 95 and 99% of the weakest maximum, each policy on its own plan for the rate
    weakest = min(m["sim_max_rps"], e["sim_max_rps"])
    assert cell["weakest_max_rps"] == pytest.approx(weakest)
    assert [r["fraction"] for r in cell["common_rates"]] == [0.9, 0.95, 0.99]
    assert [r["rate_rps"] for r in cell["common_rates"]] == pytest.approx([0.9 * weakest, 0.95 * weakest, 0.99 * weakest])
    for v in (m, e):
        assert [a["rate_rps"] for a in v["at_common"]] == pytest.approx([r["rate_rps"] for r in cell["common_rates"]])
        assert all(a["latency_mean_s"] > 0 and a["latency_p99_s"] >= a["latency_mean_s"] for a in v["at_common"])
        assert all(a["requests"] == cell["common_requests"] and a["allocation"] for a in v["at_common"])
    assert [a["milp_latency_ratio"] for a in m["at_common"]] == pytest.approx([1.0] * 3)
    assert [a["milp_latency_ratio"] for a in e["at_common"]] == pytest.approx(
        [a["latency_mean_s"] / b["latency_mean_s"] for a, b in zip(m["at_common"], e["at_common"])])
    # the bisection brackets each capacity; every run took at least the requests asked for
    assert m["sim_refused_rps"] > m["sim_max_rps"] and e["sim_refused_rps"] > e["sim_max_rps"]
    assert all(len(r) == 5 and r[4] >= 120 for r in m["capacity_runs"]) and m["capacity_max_requests"] >= 120
    assert cell["common_requests"] == max(m["capacity_max_requests"], e["capacity_max_requests"])
    assert 0 < cell["milp_fluid_fraction"] <= 1.05
    # the instance bound sits between milp's exact optimum (one configuration per LLM) and the fluid bound
    assert m["predicted_max_rps"] <= cell["instance_bound_rps"] * (1 + 1e-6) <= cell["fluid_rps"] * (1 + 1e-6)
    assert cell["milp_instance_fraction"] == pytest.approx(m["sim_max_rps"] / cell["instance_bound_rps"])
    assert cell["milp_instance_predicted_fraction"] == pytest.approx(m["predicted_max_rps"] / cell["instance_bound_rps"])
    # the bound's own allocation, measured in the simulator like the policies' plans
    assert cell["instance_bound_allocation"] and cell["instance_bound_sim_rps"] > 0
    assert cell["milp_instance_sim_fraction"] == pytest.approx(m["sim_max_rps"] / cell["instance_bound_sim_rps"])
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    # --resume: stopped after two rates of one bisection and before one latency run, the same command
    # goes on where it stopped and reports the very same figures
    journals = sorted(kept.glob("cap-*.jsonl"))
    # one latency run per distinct (allocation, rate): two policies planning alike for a rate share it
    distinct = {(a["allocation"], a["rate_rps"]) for v in cell["policies"].values() for a in v["at_common"]}
    assert cell["latency_runs"] == len(distinct)
    assert len(journals) == 3 and len(list(kept.glob("lat-*.json"))) == len(distinct) and len(list(kept.glob("plan-*"))) == 8
    judged_lines = lambda p: [x for x in p.read_text().splitlines() if x]
    longest = max(journals, key=lambda p: len(judged_lines(p)))
    judged = len(judged_lines(longest))
    longest.write_text("\n".join(judged_lines(longest)[:2]) + "\n")
    sorted(kept.glob("lat-*.json"))[0].unlink()
    again = scepsy(*cmd, timeout=600)
    assert again.returncode == 0, again.stderr
    c2 = json.loads(again.stdout)["cells"][0]
    timing = ("wall_s", "capacity_wall_s", "capacity_resumed_runs", "plan_solve_s", "sim_check_s")
    figures = lambda c: {p: {k: x for k, x in v.items() if k not in timing} for p, v in c["policies"].items()}
    assert figures(c2) == figures(cell)
    assert c2["instance_bound_sim_rps"] == cell["instance_bound_sim_rps"]
    # only the rates cut from the journal were simulated again
    again_runs = [(len(v["capacity_runs"]), v["capacity_resumed_runs"]) for v in c2["policies"].values()]
    again_runs.append((c2["instance_bound_runs"], c2["instance_bound_resumed_runs"]))
    assert sum(n - r for n, r in again_runs) == judged - 2 > 0
    said = " ".join(again.stderr.split())
    assert f"reused 8 plans, {sum(r for _, r in again_runs)} judged rates and {len(distinct) - 1} latency runs" in said, said
    assert len(list(kept.glob("lat-*.json"))) == len(distinct)


def test_bench_table_piped_keeps_every_column_whole(capsys):
    """Piped (not a terminal), the bench table is printed wide: no column is clipped, the bounds and
    the three common rates' latencies and ratios included."""
    import argparse

    from scepsy_hpc.commands import bench

    alloc = "qwen72:2xtp8 llama70:2xtp4 mixtral:1xtp4 qwen32:1xtp4"

    def at(lats, ratios):
        return [{"fraction": f, "rate_rps": f * 0.331, "allocation": alloc, "latency_mean_s": lat, "latency_p99_s": 2 * lat,
                 "milp_latency_ratio": q} for f, lat, q in zip((0.9, 0.95, 0.99), lats, ratios)]

    pol = {"allocation": alloc, "predicted_max_rps": 3.67, "sim_max_rps": 3.43, "sim_refused_rps": 3.5,
           "milp_throughput_ratio": 1.0, "capacity_max_requests": 4800, "at_common": at([31.6, 33.2, 35.9], [1, 1, 1])}
    eq = dict(pol, allocation="qwen72:4xtp2", sim_max_rps=0.331, milp_throughput_ratio=10.36,
              at_common=at([90.1, 120.4, 301.7], [0.351, 0.276, 0.119]))
    row = {"workflow": "mixture_of_agents", "gpus": 32, "fluid_rps": 4.46, "instance_bound_rps": 3.67, "weakest_max_rps": 0.331,
           "common_rates": [{"fraction": f, "rate_rps": f * 0.331} for f in (0.9, 0.95, 0.99)],
           "milp_fluid_fraction": 0.77, "milp_instance_fraction": 0.935, "instance_bound_sim_rps": 3.52,
           "milp_instance_sim_fraction": 0.974, "policies": {"milp": pol, "equal": eq}}
    bench._print([row], argparse.Namespace(gpu_type="h100-sxm", requests=1200, seed=0), 10.0)
    out = capsys.readouterr().out
    for text in ("inst. bound", "milp/inst.", "3.67 / 3.52", "97%", "77%", "max-throughput allocation", alloc, "mixture_of_agents",
                 "90/95/99%", "0.298 / 0.314 / 0.328", "31.6 / 33.2 / 35.9", "0.35 / 0.28 / 0.12", "90.1 / 120.4 / 301.7"):
        assert text in out, text
    assert "…" not in out


def test_policies_that_plan_alike_share_one_latency_run_per_rate(tmp_path, monkeypatch, capsys):
    """One LLM on one GPU: every policy plans the same whole GPU, so each common rate is simulated once,
    not once per policy (counted at the seam: the pool replaced by one that runs here), and every policy
    reads the same figures there."""
    import concurrent.futures

    from scepsy_hpc.cli import build_parser
    from scepsy_hpc.commands import bench

    class InProcess:
        def __init__(self, max_workers=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, jobs):
            return [fn(j) for j in jobs]

    simulated = []
    real = bench._latency
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", InProcess)
    monkeypatch.setattr(bench, "_latency", lambda job: simulated.append(job[4]) or real(job))
    wf = tmp_path / "one.yaml"
    wf.write_text("name: one\nllms: {m: {model: llama-3.1-8b-instruct}}\n"
                  "program:\n  - {call: m, prompt_tokens: 100, output_tokens: {geometric: {mean: 200}}}\n")
    args = build_parser().parse_args(["bench", "--workflows", str(wf), "--gpus", "1", "--requests", "120", "--policies",
                                      "milp,equal,independent", "--samples", "200", "--json"])
    assert args.run(args) == 0
    cell = json.loads(capsys.readouterr().out)["cells"][0]
    rates = [r["rate_rps"] for r in cell["common_rates"]]
    assert sorted(simulated) == sorted(rates) and len(simulated) == 3 == cell["latency_runs"]   # not 9
    at = {p: [(a["allocation"], a["rate_rps"], a["latency_mean_s"]) for a in v["at_common"]]
          for p, v in cell["policies"].items()}
    assert at["milp"] == at["equal"] == at["independent"] and [r for _, r, _ in at["milp"]] == rates
