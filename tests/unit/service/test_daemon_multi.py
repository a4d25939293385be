"""Several deployments behind the one gateway: a plan of two workflows (`scepsy plan A B` → `up plan.yaml`, its
routes as names) beside a deployment of one workflow; names are scoped, bare only where unique."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any


def test_a_two_workflow_plan_and_a_single_workflow_are_served_through_one_gateway(tmp_path: Path, state: Path,
                                                                                 sv: Any) -> None:
    multi = tmp_path / "multi.yaml"
    planned = subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", "plan", "rag_rerank", "mixture_of_agents", "--cluster",
                              "local", "--target-rps", "rag_rerank=0.5,mixture_of_agents=0.2", "--no-sim-check", "-o",
                              str(multi), "--json"], capture_output=True, text=True, timeout=300)
    assert planned.returncode == 0, planned.stderr
    for name, plan in (("mix", multi), ("rag", sv.small_plan(tmp_path / "rag.yaml"))):
        up = sv.scepsy(state, "up", str(plan), "--name", name, "--detach", "--time-scale", "0.05")
        assert up.returncode == 0, up.stderr
    mix = sv.wait_state(state, "mix", "serving")
    sv.wait_state(state, "rag", "serving")
    assert mix["workflows"] == ["rag_rerank", "mixture_of_agents"]
    every = urllib.request.Request(f"{mix['gateway_url']}/v1/models",   # the daemon's key: every deployment's names
                                   headers={"Authorization": f"Bearer {sv.daemon_key(state)}"})
    with urllib.request.urlopen(every, timeout=10) as resp:
        names = {m["id"]: m.get("scepsy_target") for m in json.load(resp)["data"]}
    # the LLM both workflows share is one deployment, known by each workflow's own name
    shared = names["mix/rag_rerank/generator"]
    assert shared == names["mix/mixture_of_agents/llama70"] == names["mix/generator"]
    assert "rag/generator" in names and "generator" not in names     # two deployments call it generator: no bare name
    assert names.get("llama70") == shared                              # unique across the gateway: bare too
    for wf, n in (("rag_rerank", 4), ("mixture_of_agents", 2)):
        drive = sv.scepsy(state, "drive", "mix", "--workflow", wf, "--requests", str(n), "--json")
        assert drive.returncode == 0, drive.stdout + drive.stderr
        assert json.loads(drive.stdout)["ok"] == n
    drive = sv.scepsy(state, "drive", "rag", "--requests", "3", "--json")
    assert json.loads(drive.stdout)["ok"] == 3
    ambiguous = sv.scepsy(state, "drive", "mix", "--json")
    assert ambiguous.returncode == 2 and "serves rag_rerank, mixture_of_agents: give --workflow" in ambiguous.stderr
