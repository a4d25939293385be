"""A hand-written plan with a mixed group through `scepsy validate`, `simulate` and `predict` (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PLAN = """\
workflow: deep_research
gpus: {type: h100-sxm, count: 16}
allocation:
  planner: {tp: 4}
  searcher:
    - {tp: 2, replicas: 1}
    - {tp: 1, gpu_frac: 0.5, replicas: 2}
  writer: {tp: 2}
"""


def scepsy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", *args], capture_output=True, text=True, timeout=180)


@pytest.fixture()
def plan_file(tmp_path):
    p = tmp_path / "mixed.yaml"
    p.write_text(PLAN)
    return str(p)


def test_a_mixed_plan_validates_simulates_and_predicts(plan_file):
    out = scepsy("validate", plan_file)
    assert out.returncode == 0, out.stderr
    sim = scepsy("simulate", "deep_research", "--plan", plan_file, "--rate", "0.5", "--requests", "60", "--json")
    assert sim.returncode == 0, sim.stderr
    doc = json.loads(sim.stdout)
    assert doc["completed"] == 60 and doc["per_llm"]["searcher"]["replicas"] == 3
    assert doc["per_llm"]["searcher"]["groups"] == "1×tp=2 + 2×gpu_frac=0.5"
    table = scepsy("simulate", "deep_research", "--plan", plan_file, "--rate", "0.5", "--requests", "30")
    assert table.returncode == 0 and "mixed" in table.stdout, table.stderr
    pred = scepsy("predict", "deep_research", "--plan", plan_file, "--rate", "0.3", "--samples", "100", "--json")
    assert pred.returncode == 0, pred.stderr
    doc = json.loads(pred.stdout)
    assert doc["per_llm"]["searcher"]["replicas"] == 3 and doc["latency_s"] > 0


def test_a_bad_mixed_plan_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(PLAN.replace("- {tp: 1, gpu_frac: 0.5, replicas: 2}", "- {tp: 2, replicas: 2}"))
    out = scepsy("validate", str(p))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{p}:7: allocation.searcher[1]: the same configuration (tp=2)" in out.stderr
