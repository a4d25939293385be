"""Pruning the latency MILP's candidates by a Lagrangian bound (candidates.prune_by_bound): the
optimum's value never changes, and at scale most candidates go."""

from __future__ import annotations

import random

import pytest

from scepsy_hpc.allocate.candidates import prune_by_bound
from scepsy_hpc.allocate.milp import Candidate, solve
from scepsy_hpc.allocate.planner import used_gpus


def curve(rng: random.Random, m: str, budget: int) -> list[Candidate]:
    """A decreasing cost curve in replicas for whole GPUs at tp 1 and 2, and a quarter-size line."""
    out = []
    base, a = rng.uniform(0.5, 5.0), rng.uniform(0.5, 20.0)
    r0 = rng.randint(1, 3)
    for tp in (1, 2):
        for r in range(r0, budget // tp + 1):
            out.append(Candidate("g", tp, 1.0, r, base / tp ** 0.3 + a / (r * tp), r * tp * 10.0))
    for r in range(1, 5):
        out.append(Candidate("g", 1, 0.25, r, base * 2 + a / r, r * 2.0))
    return out


def instance(seed: int, n_llms: int, budget: int) -> dict[str, list[Candidate]]:
    rng = random.Random(seed)
    return {f"m{i}": curve(rng, f"m{i}", budget) for i in range(n_llms)}


def fits_for(budget: int):
    return lambda choice: used_gpus(choice) <= budget


@pytest.mark.parametrize("seed", range(8))
def test_pruning_keeps_the_optimum_value(seed):
    budget = 24 + 4 * seed
    cands = instance(seed, 5, budget)
    pruned = prune_by_bound(cands, budget, fits_for(budget), above=0)
    full = solve(cands, {"g": budget})
    small = solve(pruned, {"g": budget})
    assert small.objective_s == pytest.approx(full.objective_s, rel=1e-6)
    assert sum(map(len, pruned.values())) < sum(map(len, cands.values()))
    for m, c in small.choice.items():
        assert c in cands[m]


def test_small_problems_are_left_whole():
    cands = instance(1, 3, 10)
    assert sum(map(len, cands.values())) < 400
    assert prune_by_bound(cands, 10, fits_for(10)) == cands


def test_most_candidates_go_at_scale():
    budget = 400
    cands = instance(3, 16, budget)
    pruned = prune_by_bound(cands, budget, fits_for(budget))
    before, after = sum(map(len, cands.values())), sum(map(len, pruned.values()))
    assert after < before / 4, (before, after)
    assert all(pruned.values())


def test_nothing_pruned_when_no_allocation_fits():
    cands = {m: [c for c in cs if c.gpu_frac >= 1.0] for m, cs in instance(2, 4, 8).items()}  # ≥ 1 GPU each
    assert prune_by_bound(cands, 2, fits_for(2), above=0) == cands


# ---- pricing stops early, with the same result as pricing every replica count ----

SMALL = (__import__("pathlib").Path(__file__).resolve().parents[2] / "data" / "small_rag.yaml").read_text()


def every_count(gpu, configs, load, budget, max_util, cost, eps, min_gain):
    """The reference: every replica count up to the budget priced, then Pareto-pruned."""
    from scepsy_hpc.allocate.candidates import pareto
    from scepsy_hpc.predict.alp import pooled_point

    raw = []
    for c in configs:
        mu = c.profile.capacity_rps
        r0 = max(1, int(__import__("math").ceil(load / (mu * max_util) - 1e-9)))
        for r in range(r0, c.max_replicas(budget) + 1):
            p = pooled_point(c.profile, load / r, r)
            if p is not None:
                raw.append(Candidate(gpu, c.tp, c.gpu_frac, r, cost(p, r, c.profile.arrivals == "requests"), r * mu))
    return pareto(raw, lambda c: c.cost_s, eps, min_gain)


@pytest.fixture(scope="module")
def small_planner(models, gpus):
    from scepsy_hpc.allocate.planner import Demand, Planner
    from scepsy_hpc.predict.inputs import sample_mix, sample_program
    from scepsy_hpc.spec.source import parse_yaml
    from scepsy_hpc.spec.workflow import parse_workflow

    data, smap = parse_yaml(SMALL, "small.yaml")
    wf = parse_workflow(data, smap, models)
    seqs = sample_program(wf, 200, 0)
    return Planner([Demand(wf, wf.target.throughput_rps, sample_mix(seqs), seqs)], models, gpus, "h100-sxm", 8,
                   max_tp=4, n_calls=400)


@pytest.mark.parametrize("theta,budget,min_gain", [(1.0, 64, 0.01), (3.0, 200, 0.01), (0.3, 64, 0.0), (2.0, 120, 0.05)])
def test_early_stop_prices_the_same_candidates(small_planner, theta, budget, min_gain):
    from scepsy_hpc.allocate import candidates as cand

    p = small_planner
    weights = p._weights({0: None})
    loads = p.loads(theta)
    for name, d in p.deployments.items():
        if d.calls <= 0:
            continue
        cost = cand.weights_cost(weights[name])
        got = cand.latency_candidates("h100-sxm", d.configs, loads[name], budget, 0.9, cost, 1e-3, min_gain)
        want = every_count("h100-sxm", d.configs, loads[name], budget, 0.9, cost, 1e-3, min_gain)
        assert got == want, name
        assert len(got) >= 2


def test_prompts_ahead_in_a_burst_follow_the_replicas():
    """PathWeights.prompt_sum: a critical call waits for the prompts ahead of it on its replica;
    with more replicas than its place in the burst, none (the shortcut past the last place)."""
    from scepsy_hpc.allocate.candidates import PathWeights

    w = PathWeights(2, count=2.0, prompts=(30 + 7) / 2)
    w.bursts = [((10, 20, 30, 40), 2), ((5, 6, 7), 2)]   # the critical calls: 3rd of 4, 3rd of 3
    for r in range(1, 12):
        ahead = sum(sum(p[j] for j in range(i % r, i + 1, r)) for p, i in w.bursts)
        assert w.prompt_sum(r, False) == pytest.approx(ahead / 2), r
    assert w.prompt_sum(1, False) == pytest.approx((60 + 18) / 2)
    assert w.prompt_sum(3, False) == w.prompts
    assert w.prompt_sum(2, False) == pytest.approx((40 + 12) / 2)
    assert w.prompt_sum(1, True) == w.prompts
