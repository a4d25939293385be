"""scripts/bench_table.py: one real bench cell run through it, resumed without rerunning, and its
verdicts recomputed from the cell's own figures (a doctored cell must read as a loss). scripts/sim_digest.py,
which shows a simulator change leaves the table's simulations the same: the same simulator gives the same
digests, a doctored earlier digest reads as a difference (exit 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.timeout(120)


def script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=110)


def table(*args: str) -> subprocess.CompletedProcess[str]:
    return script("bench_table.py", *args)


def test_a_cell_runs_resumes_and_reads_its_verdict(tmp_path: Path) -> None:
    args = ["--dir", str(tmp_path), "--workflows", "router_cascade", "--gpus", "4", "--requests", "100"]
    out = table(*args, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    (row,) = doc["rows"]
    raw = json.loads((tmp_path / "b_router_cascade_4.json").read_text())["cells"][0]
    meta = json.loads((tmp_path / "b_router_cascade_4.meta.json").read_text())
    assert meta["rc"] == 0 and meta["wall_s"] > 0 and meta["commit"]
    # the equal split cannot fit the 70B model in a quarter of 4 GPUs: no plan, nothing to lose to
    assert "equal" in row["no_plan"] and "equal" not in row["throughput_ratio"]
    ind = raw["policies"]["independent"]
    assert row["throughput_ratio"]["independent"] == ind["milp_throughput_ratio"]
    want = ind["milp_throughput_ratio"] >= 0.97 and all(a["milp_latency_ratio"] <= 1.05 for a in ind["at_common"])
    assert row["ok"] is want
    assert row["instance_fraction"] == raw["milp_instance_sim_fraction"]
    m = raw["policies"]["milp"]
    assert row["milp_prediction_ratio"] == pytest.approx(m["predicted_max_rps"] / m["sim_max_rps"])
    # run again: the cell is not measured again
    again = table(*args, "--json")
    assert again.returncode == 0 and "cell router_cascade" not in again.stderr
    assert json.loads((tmp_path / "b_router_cascade_4.meta.json").read_text()) == meta
    # a cell where milp is 20% slower than a baseline at one common rate is a loss, named as such
    raw["policies"]["independent"]["at_common"][1]["milp_latency_ratio"] = 1.2
    (tmp_path / "b_router_cascade_4.json").write_text(json.dumps({"cells": [raw]}))
    text = table(*args, "--table-only")
    assert text.returncode == 0, text.stderr
    assert "| LOSS |" in text.stdout and "losses: router_cascade × 4" in text.stdout
    assert "no equal plan for router_cascade × 4" in text.stdout
    # the predictor's error on milp's plan, read from the cell: a doctored 2× prediction is named as over-rated
    raw["policies"]["milp"]["predicted_max_rps"] = 2 * raw["policies"]["milp"]["sim_max_rps"]
    (tmp_path / "b_router_cascade_4.json").write_text(json.dumps({"cells": [raw]}))
    text = table(*args, "--table-only")
    assert "within ±8% of its simulated max on 0 of 1; over-rated: router_cascade × 4 2.00×" in text.stdout
    assert "| 2.00 | LOSS |" in text.stdout


def test_an_unknown_workflow_is_refused_with_the_choices(tmp_path: Path) -> None:
    out = table("--dir", str(tmp_path), "--workflows", "nope", "--table-only")
    assert out.returncode == 2 and "no configs/workflows/nope.yaml" in out.stderr and "beam_search" in out.stderr


def test_same_simulator_same_digests_and_a_changed_one_differs(tmp_path: Path) -> None:
    args = ["--plans", str(tmp_path / "plans"), "--workflows", "router_cascade", "--gpus", "4",
            "--requests", "30"]
    first = script("sim_digest.py", *args)
    assert first.returncode == 0, first.stderr
    assert [p.name for p in (tmp_path / "plans").iterdir()] == ["router_cascade.yaml"]
    (line,) = first.stdout.splitlines()
    assert line.split()[0] == "router_cascade" and len(line.split()[1]) == 16
    before = tmp_path / "before.txt"
    before.write_text(first.stdout)
    again = script("sim_digest.py", *args, "--against", str(before))
    assert again.returncode == 0 and again.stdout.strip() == line + "  same", again.stdout + again.stderr
    before.write_text("router_cascade 0123456789abcdef\n")
    changed = script("sim_digest.py", *args, "--against", str(before))
    assert changed.returncode == 1
    assert "router_cascade" in changed.stdout and "DIFFERS (was 0123456789abcdef)" in changed.stdout
    assert "1 of 1 differ" in changed.stderr


def test_sim_digest_refuses_an_unknown_workflow(tmp_path: Path) -> None:
    out = script("sim_digest.py", "--plans", str(tmp_path), "--workflows", "../etc/passwd")
    assert out.returncode == 2 and "--workflows: no shipped workflow '../etc/passwd'; choose from agents_handoffs" \
        in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "router_cascade.yaml").write_text("garbage: [\n")
    out = script("sim_digest.py", "--plans", str(tmp_path), "--workflows", "router_cascade")
    assert out.returncode == 2 and "not a plan of router_cascade" in out.stderr and "Traceback" not in out.stderr
