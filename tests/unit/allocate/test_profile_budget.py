"""The synthetic profiles' call budget (allocate.planner.profile_calls): small workflows keep 2,000
calls per point; a large one shares a fixed budget, so its profiles cost what 8 LLMs' cost."""

from __future__ import annotations

import sys
from pathlib import Path

from scepsy_hpc.allocate.planner import Demand, Planner, profile_calls
from scepsy_hpc.predict.inputs import sample_mix, sample_program
from scepsy_hpc.spec.source import parse_yaml
from scepsy_hpc.spec.workflow import parse_workflow

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from bench_milp_scale import workflow_text  # noqa: E402


def test_budget_shares_calls_among_many_deployments():
    assert [profile_calls(n) for n in (1, 5, 8)] == [2000, 2000, 2000]
    assert profile_calls(16) == 1000 and profile_calls(32) == 500
    assert profile_calls(200) == 500 and profile_calls(0) == 2000


def test_a_planner_of_many_llms_profiles_with_fewer_calls(models, gpus, monkeypatch):
    from scepsy_hpc.allocate import planner as planner_mod

    monkeypatch.setattr(planner_mod, "PROFILE_CALLS", 1200)           # small figures: a quick test
    monkeypatch.setattr(planner_mod, "PROFILE_CALLS_PER_LLM", (100, 300))
    for n, want in ((4, 300), (9, 133)):
        data, smap = parse_yaml(workflow_text(n, 5.0), "scale.yaml")
        wf = parse_workflow(data, smap, models)
        seqs = sample_program(wf, 60, 0)
        p = Planner([Demand(wf, 5.0, sample_mix(seqs), seqs)], models, gpus, "h100-sxm", 8 * n, max_tp=2,
                    fractions=(), n_calls=None)
        assert p.n_calls == want
        prof = next(iter(p.deployments.values())).configs[0].profile
        assert prof.workload["calls_per_point"] == want
    # an explicit figure wins
    p = Planner([Demand(wf, 5.0, sample_mix(seqs), seqs)], models, gpus, "h100-sxm", 72, max_tp=2, fractions=(),
                n_calls=250)
    assert p.n_calls == 250
