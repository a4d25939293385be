"""The planning API: `plan(PlanRequest) -> PlanResult` gives what `scepsy plan` gives, writes nothing
onto its inputs, returns frozen values; placement re-plans around what does not place."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scepsy_hpc.planning import PlanRequest, PlanResult, plan, prepare
from scepsy_hpc.spec.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[3]
SMALL = ROOT / "tests" / "data" / "small_rag.yaml"


@pytest.fixture(scope="module")
def request_4(models, gpus) -> PlanRequest:
    return PlanRequest(workflows=(load_workflow(SMALL, models),), models=models, gpus=gpus, gpu_count=4, samples=300,
                       sim_check=False, workflow_files=(str(SMALL),))


@pytest.fixture(scope="module")
def result_4(request_4) -> PlanResult:
    return plan(request_4)


def test_the_api_plans_what_the_cli_plans(result_4):
    out = subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", "plan", str(SMALL), "--gpus", "4", "--samples", "300",
                          "--no-sim-check", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    api = result_4.summary()
    assert cli["allocation"] == api["allocation"]
    assert cli["predicted"]["latency_s"] == api["predicted"]["latency_s"]
    assert cli["predicted"]["throughput_rps"] == api["predicted"]["throughput_rps"]
    assert (cli["status"], cli["gpus_used"], cli["goal"]) == (result_4.status, api["gpus_used"], "target")
    plan_file = result_4.to_plan()
    assert {m: [(g.tp, g.gpu_frac, g.replicas) for g in gs] for m, gs in plan_file.groups().items()} == \
        {m: [(g["tp"], g["gpu_frac"], g["replicas"]) for g in (a if isinstance(a, list) else [a])]
         for m, a in cli["allocation"].items()}
    assert plan_file.gpus.count == 4 and plan_file.provenance["workflow_file"] == str(SMALL)


def test_inputs_are_not_written_to(request_4, models, gpus):
    before = copy.deepcopy(request_4)
    planner = prepare(request_4)
    caps, n = dict(planner.domain_caps), planner.n_gpus
    res = plan(dataclasses.replace(request_4, gpu_count=3, goal="max-throughput"), planner=planner)
    assert request_4 == before
    assert request_4.models == before.models and request_4.gpus == before.gpus
    assert (planner.n_gpus, planner.domain_caps) == (n, caps)   # the planner given is copied for 3 GPUs
    assert res.gpu_count == 3 and res.planner is not planner
    assert planner.demands[0].stats is not None and res.planner.demands is planner.demands


def test_results_are_frozen(result_4):
    with pytest.raises(dataclasses.FrozenInstanceError):
        result_4.outcome = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result_4.outcome.status = "optimal"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result_4.request.policy = "equal"  # type: ignore[misc]
    assert isinstance(result_4.notes, tuple) and isinstance(result_4.outcome.checked, tuple)


def test_the_goal_comes_from_the_workflows_targets(request_4):
    from scepsy_hpc.planning.api import resolve_goal

    assert resolve_goal(request_4) == ("target", None)
    assert resolve_goal(dataclasses.replace(request_4, goal="slo", latency_slo_s=2.0)) == ("slo", 2.0)
    with pytest.raises(Exception) as e:
        resolve_goal(dataclasses.replace(request_4, goal="slo"))
    assert "--latency-slo" in str(e.value)


def test_a_bad_request_is_refused_before_planning(request_4):
    from scepsy_hpc.errors import SpecError

    with pytest.raises(SpecError) as e:
        plan(dataclasses.replace(request_4, target_rps={"nope": 1.0}))
    assert "no workflow 'nope'" in str(e.value)
    with pytest.raises(SpecError) as e:
        plan(dataclasses.replace(request_4, workflows=request_4.workflows * 2))
    assert "given twice" in str(e.value)
    with pytest.raises(SpecError) as e:
        plan(dataclasses.replace(request_4, gpu_count=None))
    assert "--gpus N" in str(e.value)


def test_the_cli_policies_are_the_planners():
    from scepsy_hpc.allocate import policies
    from scepsy_hpc.planning.request import POLICIES

    assert POLICIES == policies.POLICIES


def test_failed_placement_is_replanned_around(monkeypatch):
    """The planner learns from a placement failure: the failing shape is capped, the plan changes."""
    from scepsy_hpc.allocate.planner import Demand, Planner
    from scepsy_hpc.place import placement as placement_mod
    from scepsy_hpc.planning.api import plan_and_place
    from scepsy_hpc.planning.inputs import load_workload
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.cluster import load_cluster
    from scepsy_hpc.spec.plan import groups_of
    from scepsy_hpc.spec.workflow import load_workflow
    from scepsy_hpc.topology.build import from_cluster

    models, gpus = load_models(ROOT / "configs" / "models.yaml"), load_gpus(ROOT / "configs" / "gpus.yaml")
    wf = load_workflow(ROOT / "configs" / "workflows" / "deep_research.yaml", models)
    topo = from_cluster(load_cluster(ROOT / "configs" / "clusters" / "local.yaml", gpus), gpus)
    work = load_workload(wf, None, 300, 0)
    planner = Planner([Demand(wf, 1.0, work.mix, work.seqs, list(work.graphs))], models, gpus, "h100-sxm", 16, max_tp=4)
    real_place = placement_mod.place
    calls = []

    def flaky_place(alloc, topo, **kw):
        calls.append({m: tuple(g.tp for g in groups_of(a)) for m, a in alloc.items()})
        if len(calls) == 1:
            w = next(w for w in placement_mod.wants_of(alloc) if w.tp == 4)
            raise placement_mod.PlacementError("cannot place (injected)", w, 2)
        return real_place(alloc, topo, **kw)

    monkeypatch.setattr(placement_mod, "place", flaky_place)
    out, placement, planned = plan_and_place(planner, "milp", "target", None, topo)
    assert len(calls) == 2
    assert planned.domain_caps[4] == 2
    assert planner.domain_caps == {} and planned is not planner   # re-planned on a copy; the planner given is unchanged
    n4 = sum(g.replicas for c in out.choice.values() for g in c.groups if g.tp == 4)
    assert n4 <= 2 and any("re-planned with at most 2 group(s) of 4 GPUs" in n for n in out.notes)
    assert len(placement.instances) == sum(c.total_replicas for c in out.choice.values())
