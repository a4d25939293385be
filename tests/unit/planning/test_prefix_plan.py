"""Issue 22's measure: on a ReAct workflow (8 steps, growing context), `scepsy plan` with the prefix cache
modelled chooses another allocation than without it, and that allocation is better when both are measured in
the simulator (which models the cache, as vLLM runs by default). scripts/bench_prefix_plan.py prints it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_reuse_aware_plan_differs_and_measures_better() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_prefix_plan.py"), "--no-sim-check",
                           "--requests", "300", "--rates", "2", "--json"], capture_output=True, text=True, cwd=ROOT,
                          timeout=580)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    aware, blind = doc["plans"]["reuse-aware"]["allocation"], doc["plans"]["reuse-blind"]["allocation"]
    assert aware != blind
    (row,) = doc["rows"]
    assert row["ratio"]["latency_mean_s"] < 0.85, row          # measured 0.70 (19.4 s against 27.7 s)
    assert row["ratio"]["throughput_rps"] > 0.97, row          # and both keep up with the 2 rps offered
    assert row["reuse-aware"]["prefix_hit_rate"]["agent"] > 0.8
