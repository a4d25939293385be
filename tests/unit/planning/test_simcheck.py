"""The simulator check of the milp plan (planning.simcheck): the shortlist, the latency check and
the throughput goal's race, with the simulator replaced at its seams and for real."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from scepsy_hpc.allocate import policies
from scepsy_hpc.allocate.milp import choice_key
from scepsy_hpc.allocate.planner import Demand, Planner, used_gpus
from scepsy_hpc.planning import policy, simcheck
from scepsy_hpc.planning.simcheck import RaceRun, SimCheck, neighbours, shortlist
from scepsy_hpc.predict.inputs import sample_mix, sample_program
from scepsy_hpc.spec.source import parse_yaml
from scepsy_hpc.spec.workflow import parse_workflow

SMALL = (Path(__file__).resolve().parents[2] / "data" / "small_rag.yaml").read_text()


def parse_workflow_text(text, name, models):
    data, smap = parse_yaml(text, name)
    return parse_workflow(data, smap, models)


def make_planner(models, gpus, n_gpus, text=SMALL, weight=None, max_tp=4):
    wf = parse_workflow_text(text, "small.yaml", models)
    seqs = sample_program(wf, 300, 0)
    w = weight or wf.target.throughput_rps
    return Planner([Demand(wf, w, sample_mix(seqs), seqs)], models, gpus, "h100-sxm", n_gpus, max_tp=max_tp,
                   n_calls=500)


# ---- the simulator check of the milp plan ----


key = choice_key


@pytest.fixture(scope="module")
def planner6(models, gpus):
    # one configuration per LLM: the throughput race's moves keep an instance size (a mixed group does not move)
    p = make_planner(models, gpus, 6)
    p.mixed_groups = False
    return p


def test_shortlist_is_distinct_fits_and_carries_the_load(planner6):
    check = SimCheck()
    best = policies.plan_at(planner6, "milp", 1.0)
    items = shortlist(planner6, best, check)
    assert items[0] == ("optimum", best.choice)
    assert len(items) >= 3, items  # lower caps, spread instances or other splits exist on 6 GPUs
    assert len({key(c) for _, c in items}) == len(items)
    loads = planner6.loads(1.0)
    for label, choice in items:
        assert used_gpus(choice) <= planner6.n_gpus, label
        for m, c in choice.items():
            mu = next(k.profile.capacity_rps for k in planner6.deployments[m].configs
                      if k.tp == c.tp and k.gpu_frac == c.gpu_frac)
            assert c.replicas * mu * planner6.max_util >= loads[m] - 1e-9, (label, m)


def fake_simulate(latencies):
    """SimCheck.simulate replaced at its seam: a latency per allocation, recorded calls."""
    seen = []

    def simulate(self, planner, choice, theta):
        seen.append(key(choice))
        return latencies(key(choice), len(seen)), theta

    return simulate, seen


def test_check_keeps_the_optimum_unless_beaten_by_the_margin(planner6, monkeypatch):
    check = SimCheck(margin=0.05, jobs=1)   # in turn: the fake simulator is this process's
    best = policies.plan_at(planner6, "milp", 1.0)
    # every other allocation 3% faster: within the margin, the optimum stays
    sim, seen = fake_simulate(lambda k, i: 10.0 if i == 1 else 9.7)
    monkeypatch.setattr(SimCheck, "simulate", sim)
    out = policy.checked(planner6, check, "milp", policies.plan_at(planner6, "milp", 1.0))
    assert key(out.choice) == key(best.choice)
    assert seen[0] == key(best.choice) and len(seen) == len(out.checked) >= 3
    assert out.checked[0].label == "optimum" and out.checked[0].simulated_s == 10.0
    note = next(n for n in out.notes if n.startswith("simulator check"))
    assert "kept" in note
    # the third allocation 20% faster: it replaces the optimum, with its own prediction
    sim, seen = fake_simulate(lambda k, i: 8.0 if i == 3 else 10.0)
    monkeypatch.setattr(SimCheck, "simulate", sim)
    out = policy.checked(planner6, check, "milp", policies.plan_at(planner6, "milp", 1.0))
    assert key(out.choice) == seen[2] != key(best.choice)
    note = next(n for n in out.notes if n.startswith("simulator check"))
    assert out.checked[2].label in note and "8 s" in note
    assert out.predictions["small_rag"].latency_s == pytest.approx(out.checked[2].predicted_s)
    assert out.check_time_s > 0


def test_check_runs_the_real_simulator(planner6):
    check = SimCheck(alternatives=1, caps=(0.6,), calls=3000, min_requests=150)
    out = policy.run(planner6, "milp", "target", check=check)
    assert out.checked and all(c.simulated_s > 0 and c.throughput_rps > 0 for c in out.checked)
    best = min(c.simulated_s for c in out.checked)
    kept = next(c for c in out.checked if key(c.choice) == key(out.choice))
    assert kept.simulated_s <= best / (1 - check.margin) + 1e-9
    assert out.status in ("optimal", "feasible")


def test_allocations_simulated_in_processes_read_as_in_turn(planner6):
    """The latency check simulates its shortlist in one process per CPU (`SimCheck.simulate_all`): the
    same seeds, so the same figures as one after another."""
    best = policies.plan_at(planner6, "milp", 1.0)
    choices = [c for _, c in shortlist(planner6, best, SimCheck())][:3]
    small = dict(calls=3000, min_requests=150)
    apart = SimCheck(jobs=2, **small).simulate_all(planner6, choices, 1.0)
    in_turn = SimCheck(jobs=1, **small).simulate_all(planner6, choices, 1.0)
    assert len(apart) == 3 and apart == in_turn
    assert apart[0] == SimCheck(**small).simulate(planner6, choices[0], 1.0)


def test_baselines_are_not_checked(planner6, monkeypatch):
    check = SimCheck()
    sim, seen = fake_simulate(lambda k, i: 1.0)
    monkeypatch.setattr(SimCheck, "simulate", sim)
    out = policy.run(planner6, "equal", "target", check=check)
    assert not seen and not out.checked


def test_check_is_off_with_several_workflows(models, gpus):
    other = SMALL.replace("name: small_rag", "name: other")
    demands = []
    for i, text in enumerate((SMALL, other)):
        wf = parse_workflow_text(text, f"{i}.yaml", models)
        seqs = sample_program(wf, 200, 0)
        demands.append(Demand(wf, 2.0, sample_mix(seqs), seqs))
    p = Planner(demands, models, gpus, "h100-sxm", 6, max_tp=4, n_calls=400)
    check = SimCheck()
    out = policy.run(p, "milp", "target", check=check)
    assert not out.checked
    assert any("one workflow at a time" in n for n in out.notes)


def test_the_baselines_allocations_are_shortlisted_when_they_carry_the_rate(planner6):
    """The equal and independent policies' allocations join the shortlist (unless one is already on
    it), after the caps and spreads, before the other splits; one that does not carry the rate does not."""
    best = policies.plan_at(planner6, "milp", 1.0)
    items = shortlist(planner6, best, SimCheck())
    keys = {key(c): label for label, c in items}
    for pol in ("equal", "independent"):
        o = policies.plan_at(planner6, pol, 1.0)
        assert all(lp.utilisation < 1.0 for pr in o.predictions.values() for lp in pr.per_llm.values())
        assert key(o.choice) in keys, pol
    labels = [label for label, _ in items]
    if "equal split" in labels and any(lb.startswith("split ") for lb in labels):
        assert labels.index("equal split") < min(i for i, lb in enumerate(labels) if lb.startswith("split "))
    assert simcheck.baseline(planner6, "equal", 1.0) is not None
    # at 50x the rate no baseline carries it: none is offered
    assert simcheck.baseline(planner6, "equal", 50.0) is None
    assert simcheck.baseline(planner6, "independent", 50.0) is None
    # without baselines the shortlist has none of their labels
    assert not any(lb.endswith("split") and not lb.startswith("split")
                   for lb, _ in shortlist(planner6, best, SimCheck(baselines=())))


@pytest.mark.slow
def test_beam_search_keeps_a_plain_split_that_simulates_faster(models, gpus):
    """beam_search on 8 GPUs at 0.568 rps: the MILP's mixed groups simulate at 149–199 s mean latency,
    4 + 4 whole GPUs (the equal split) at ~140 s (lock-step fan-out: a slow fractional instance holds
    every step). The check must keep a baseline's allocation when it simulates faster."""
    from scepsy_hpc.commands.common import resolve_input
    from scepsy_hpc.planning import plan
    from scepsy_hpc.planning.request import PlanRequest
    from scepsy_hpc.spec.workflow import load_workflow

    wf = load_workflow(resolve_input("beam_search", "workflows"), models)
    req = PlanRequest(workflows=(wf,), models=models, gpus=gpus, policy="milp", goal="target",
                      target_rps={wf.name: 0.568}, gpu_type="h100-sxm", gpu_count=8)
    out = plan(req).outcome
    rows = {c.label: c for c in out.checked}
    assert "equal split" in rows
    kept = next(c for c in out.checked if key(c.choice) == key(out.choice))
    assert kept.simulated_s == min(c.simulated_s for c in out.checked)
    assert kept.simulated_s <= rows["equal split"].simulated_s
    assert kept.simulated_s < rows["optimum"].simulated_s * 0.9
    assert any(n.startswith("latency: the predictor says") for n in out.notes)


def test_requests_follow_the_calls_budget():
    c = SimCheck(calls=100_000, min_requests=500, max_requests=2000)
    assert c.requests_for(300.0) == 500       # many calls per request: the floor
    assert c.requests_for(80.0) == 1250
    assert c.requests_for(5.0) == 2000        # few calls per request: the ceiling


# ---- the throughput goal's check: simulated maximum sustainable rate ----


def fake_race(capacity, calls=1000):
    """SimCheck.race replaced at its seam: an allocation sustains every rate up to capacity(choice); each
    judgement simulates `calls` LLM calls."""
    seen = []

    def race(self, planner, choices, rate, paths=None, quorum=None):
        out = []
        for c in choices:
            seen.append((key(c), rate))
            cap = capacity(c)
            out.append(RaceRun(rate <= cap, 10.0 * rate / cap, min(rate, cap), {m: 0.0 for m in c}, calls))
        return out

    return race, seen


def test_neighbours_move_a_gpu_and_fit(planner6):
    best = policies.max_throughput(planner6, "milp")
    names = list(best.choice)
    waits = {names[0]: 0.0, names[1]: 5.0}
    got = neighbours(planner6, best.choice, 1.0, waits)
    assert got, "a 6-GPU plan of two LLMs has a move"
    for label, c in got:
        assert planner6.fits(c), label
        moved = [m for m in names if c[m] != best.choice[m]]
        assert len(moved) == 2, label
        giver, taker = sorted(moved, key=lambda m: c[m].gpus - best.choice[m].gpus)
        assert best.choice[giver].gpus - c[giver].gpus >= 1.0 - 1e-9 and c[taker].gpus > best.choice[taker].gpus
        assert (c[giver].tp, c[giver].gpu_frac) == (best.choice[giver].tp, best.choice[giver].gpu_frac)
        assert c[giver].replicas >= 1
    # the LLM that waited longest receives first
    first = got[0][1]
    assert first[names[1]].gpus > best.choice[names[1]].gpus


def test_throughput_check_climbs_to_the_better_split(planner6, monkeypatch):
    best = policies.max_throughput(planner6, "milp")
    names = list(best.choice)
    x0 = best.choice[names[1]].gpus
    r0 = 0.6 * best.theta * planner6.demands[0].weight_rps   # the simulator below the predictor, as on beam_search
    # capacity grows with the GPUs of the second LLM: r0 at the optimum, +20% per GPU more
    race, seen = fake_race(lambda c: r0 * (1.0 + 0.2 * (c[names[1]].gpus - x0)))
    monkeypatch.setattr(SimCheck, "race", race)
    check = SimCheck(jobs=1, max_sims=40, throughput=True)
    out = policy.run(planner6, "milp", "max-throughput", check=check)
    assert out.choice[names[1]].gpus > x0 + 1.0 - 1e-9      # more than one move up the gradient
    kept = next(r for r in out.checked if key(r.choice) == key(out.choice))
    opt = out.checked[0]
    assert opt.label == "optimum" and opt.sustained_rps == pytest.approx(r0, rel=0.04)
    assert kept.sustained_rps >= opt.sustained_rps * (1 + check.step) - 1e-9
    assert kept.sustained_rps <= r0 * (1.0 + 0.2 * (out.choice[names[1]].gpus - x0)) + 1e-9   # never above its capacity
    assert len(seen) <= check.max_sims
    assert "simulator check (throughput)" in out.notes[-1] and "is kept" in out.notes[-1]
    assert planner6.fits(out.choice) and out.status != "under-capacity"
    assert out.check_time_s > 0 and out.checked[0].to_dict()["sustained_rps"] == opt.sustained_rps


def test_throughput_check_keeps_the_optimum_within_a_step(planner6, monkeypatch):
    best = policies.max_throughput(planner6, "milp")
    r0 = 0.6 * best.theta * planner6.demands[0].weight_rps
    race, seen = fake_race(lambda c: r0 * (1.0 if key(c) == key(best.choice) else 1.01))
    monkeypatch.setattr(SimCheck, "race", race)
    check = SimCheck(jobs=1, throughput=True)
    out = policy.run(planner6, "milp", "max-throughput", check=check)
    assert key(out.choice) == key(best.choice)
    assert len({k for k, _ in seen}) >= 3                      # the optimum and at least two contenders ran
    assert "kept" in out.notes[-1] and "no other" in out.notes[-1]


def test_throughput_check_runs_the_real_simulator(planner6):
    check = SimCheck(calls=2000, min_requests=200, max_requests=300, max_sims=16, jobs=2, alternatives=1, caps=(0.6,),
                     throughput=True)
    out = policy.run(planner6, "milp", "max-throughput", check=check)
    assert out.checked and out.checked[0].label == "optimum"
    assert out.checked[0].sustained_rps > 0
    assert all(r.refused_rps is None or r.refused_rps > (r.sustained_rps or 0.0) for r in out.checked)
    assert planner6.fits(out.choice)


def test_throughput_race_is_opt_in(planner6, monkeypatch):
    # without --sim-check-throughput only the tolerance check runs: the plan and the allocation of the most
    # capacity, never a shortlist or a neighbour
    race, seen = fake_race(lambda c: 1.0)
    monkeypatch.setattr(SimCheck, "race", race)
    best = policies.max_throughput(planner6, "milp")
    out = policy.run(planner6, "milp", "max-throughput", check=SimCheck())
    assert {k for k, _ in seen} <= {key(best.choice), key(best.top_choice)}
    assert len(out.checked) in (0, 2)
    assert not any("(throughput)" in n for n in out.notes)


def with_top(planner, best):
    """`best` with an allocation of the same GPUs, split otherwise, as its allocation of the most capacity."""
    _, other = neighbours(planner, best.choice, 1.0)[0]
    return replace(best, top_choice=other)


def tolerance_case(planner, monkeypatch, plan_x, top_x):
    """(best with a top_choice, its planned rate, the fake race's log): the plan sustains up to `plan_x`, the
    allocation of the most capacity up to `top_x` × the planned rate."""
    best = with_top(planner, policies.max_throughput(planner, "milp"))
    planned = best.theta * planner.demands[0].weight_rps
    race, seen = fake_race(lambda c: planned * (plan_x if key(c) == key(best.choice) else top_x))
    monkeypatch.setattr(SimCheck, "race", race)
    return best, planned, seen


def test_tolerance_check_takes_the_allocation_of_most_capacity_when_the_plan_falls_short(planner6, monkeypatch):
    # the plan holds 70% of its planned rate, the other allocation 90%: neither holds the planned rate
    best, planned, seen = tolerance_case(planner6, monkeypatch, 0.7, 0.9)
    out = simcheck.run_check(planner6, SimCheck(jobs=1), best, "throughput")
    assert key(out.choice) == key(best.top_choice)
    rates = sorted({r for _, r in seen}, reverse=True)
    assert rates[0] == pytest.approx(planned) and len(rates) == 2     # down one step: 0.89 of it tells them apart
    plan_row, top_row = out.checked
    assert plan_row.refused_rps == pytest.approx(rates[1]) and top_row.sustained_rps == pytest.approx(rates[1])
    assert any("that allocation is kept" in n for n in out.notes)
    assert "short of the" in out.notes[-1]            # the kept one does not hold the planned rate either: said
    assert planner6.fits(out.choice) and out.theta == best.theta


def test_tolerance_check_keeps_the_plan_when_it_holds_more_or_as_much(planner6, monkeypatch):
    best, planned, seen = tolerance_case(planner6, monkeypatch, 1.2, 1.07)
    out = simcheck.run_check(planner6, SimCheck(jobs=1), best, "throughput")
    assert key(out.choice) == key(best.choice)
    assert len({r for _, r in seen}) == 3              # 1.0, 1.05 both hold; 1.1025 only the plan
    assert "where the other does not; kept" in out.notes[-1]
    # the same capacity: both fall out at the same step, the plan is kept
    best, planned, seen = tolerance_case(planner6, monkeypatch, 1.07, 1.07)
    out = simcheck.run_check(planner6, SimCheck(jobs=1), best, "throughput")
    assert key(out.choice) == key(best.choice) and "neither" in out.notes[-1]


def test_tolerance_check_stops_at_its_budget_and_skips_a_plan_of_most_capacity(planner6, monkeypatch):
    best, planned, seen = tolerance_case(planner6, monkeypatch, 1e9, 1e9)
    out = simcheck.run_check(planner6, SimCheck(jobs=1, tol_sims=6), best, "throughput")
    assert len(seen) == 6 and key(out.choice) == key(best.choice)
    assert "within 6 runs" in out.notes[-1]
    # the note names the last rate judged, not the next one
    judged = sorted({r for _, r in seen})
    assert f"to {judged[-1]:.3g} rps told them apart" in out.notes[-1]
    assert f"{judged[-1] * 1.05:.3g}" not in out.notes[-1]
    # nothing to tell apart: the plan is the allocation of the most capacity, judged alone (test below)
    seen.clear()
    same = replace(best, top_choice=dict(best.choice))
    out = simcheck.run_check(planner6, SimCheck(jobs=1), same, "throughput")
    assert seen == [(key(best.choice), pytest.approx(planned))] and key(out.choice) == key(best.choice)


def test_a_plan_of_most_capacity_is_judged_at_the_rate_planned(planner6, monkeypatch):
    """Nothing to tell apart (the plan is the allocation of the most predicted capacity): it is judged alone at
    the planned rate: one run when it holds; one step down when it refuses; the shortfall said, the plan kept."""
    best = policies.max_throughput(planner6, "milp")
    same = replace(best, top_choice=None)         # no allocation of more capacity: the same as itself
    planned = best.theta * planner6.demands[0].weight_rps
    for x, rates, said in ((1.3, [1.0], "sustains the"), (0.95, [1.0, 1 / 1.12], "and sustains"),
                           (0.85, [1.0, 1 / 1.12], "(planned) and")):
        race, seen = fake_race(lambda c: planned * x)
        monkeypatch.setattr(SimCheck, "race", race)
        out = simcheck.run_check(planner6, SimCheck(jobs=1, repair_rounds=0), same, "throughput")
        assert [r for _, r in seen] == pytest.approx([planned * r for r in rates]), x
        assert key(out.choice) == key(best.choice) and out.theta == best.theta
        notes = " ".join(out.notes)
        assert "simulator check (capacity)" in notes and said in notes, (x, out.notes)
        assert ("short of the" in out.notes[-1]) == (x < 1), (x, out.notes)   # a shortfall is said, with the figure to trust
        (row,) = out.checked
        assert row.label == "plan" and (row.refused_rps is None) == (x >= 1)
        assert out.check_time_s > 0
    # a budget of no runs: nothing judged, said
    race, seen = fake_race(lambda c: planned)
    monkeypatch.setattr(SimCheck, "race", race)
    out = simcheck.run_check(planner6, SimCheck(jobs=1, tol_sims=0), same, "throughput")
    assert not seen and "no run within 0 runs" in out.notes[-1] and key(out.choice) == key(best.choice)
    assert out.checked[0].sustained_rps is None and "sustained_rps" not in out.checked[0].to_dict()
    # a budget of one run, refused at the planned rate: said as such (one rate, not two), no repair on one reading
    race, seen = fake_race(lambda c: planned * 0.5)
    monkeypatch.setattr(SimCheck, "race", race)
    for check in (SimCheck(jobs=1, tol_sims=1), SimCheck(jobs=1, tol_calls=500)):
        out = simcheck.run_check(planner6, check, same, "throughput")
        assert len(seen) == 1 and key(out.choice) == key(best.choice)
        notes = " ".join(out.notes)
        assert "ended before a rate step down" in notes and "(planned) and" not in notes and "repair" not in notes
        assert "short of the" in out.notes[-1]
        seen.clear()


def test_a_plan_of_most_capacity_a_step_short_is_repaired(planner12, monkeypatch):
    """The plan is the allocation of the most capacity and an LLM carries half its predicted rate: the
    capacity check finds it a step short and the repair re-plans, as after the two-allocation check."""
    best = policies.max_throughput(planner12, "milp")
    same = replace(best, top_choice=dict(best.choice))
    short = bottleneck(planner12, best.choice)
    race, seen, limit = short_llm_race(planner12, short, 0.5)
    monkeypatch.setattr(SimCheck, "race", race)
    out = simcheck.run_check(planner12, SimCheck(jobs=1), same, "throughput")
    notes = " ".join(out.notes)
    assert "simulator check (capacity)" in notes and "the last that won is kept" in notes, out.notes
    assert limit(out.choice) > limit(best.choice) * 1.05 and planner12.fits(out.choice)
    assert out.checked[0].label == "plan" and out.checked[-1].label.startswith("repair: ")
    assert out.checked[-1].sustained_rps <= limit(out.choice) * (1 + 1e-9)
    assert len(seen) <= 2 + SimCheck().repair_sims


def test_tolerance_check_budget_counts_simulated_calls_not_seconds(planner6, monkeypatch):
    """The budget is work (LLM calls simulated), read before each rate: the same plan however busy the
    machine. Judgements of 300,000 calls each: two rates (1.2M calls) pass the 1M budget, a third is not started."""
    best = with_top(planner6, policies.max_throughput(planner6, "milp"))
    planned = best.theta * planner6.demands[0].weight_rps
    race, seen = fake_race(lambda c: planned * 1e9, calls=300_000)
    monkeypatch.setattr(SimCheck, "race", race)
    clock = iter(range(0, 10**9, 1000))   # every reading of the clock 1,000 s later: time does not stop it
    monkeypatch.setattr(simcheck.time, "perf_counter", lambda: float(next(clock)))
    out = simcheck.run_check(planner6, SimCheck(jobs=1, tol_calls=1_000_000), best, "throughput")
    assert len(seen) == 4 and key(out.choice) == key(best.choice)
    assert "within 8 runs / 1,000,000 simulated calls" in out.notes[-1] and "1,200,000 calls" in out.notes[-1]


def test_tolerance_check_runs_the_real_simulator(planner6):
    best = with_top(planner6, policies.max_throughput(planner6, "milp"))
    check = SimCheck(calls=2000, min_requests=200, max_requests=300, jobs=2)
    out = simcheck.run_check(planner6, check, best, "throughput")
    plan_row, top_row = out.checked[:2]
    repairs = out.checked[2:]
    assert plan_row.label == "plan" and top_row.label == "most capacity"
    assert all(r.label.startswith("repair: ") for r in repairs)
    chosen = top_row if key(best.choice) != key(out.choice) == key(top_row.choice) else plan_row
    if repairs and key(out.choice) == key(repairs[-1].choice):
        # repaired: the allocation the tolerance check kept refused the planned rate; the repair held more
        assert chosen.refused_rps is not None and chosen.sustained_rps
        assert repairs[-1].sustained_rps > chosen.sustained_rps
    else:
        kept = chosen
        other = plan_row if kept is top_row else top_row
        # the verdict agrees with the runs: the kept one was never refused a rate the other held
        assert not (kept.refused_rps is not None and (other.sustained_rps or 0.0) >= kept.refused_rps)
    assert out.check_time_s > 0 and "simulator check (tolerance)" in " ".join(out.notes)
    assert " calls, " in " ".join(out.notes)          # the real judgements count the calls they simulated


def test_a_plan_the_judge_cannot_read_is_said_unchecked_not_judged(planner6, monkeypatch):
    """A judgement needs runs spanning 2.5 latencies at the planned rate; when that is past the longest run the
    judge makes (32 chained LLMs on 1,024 GPUs: ~49,000 requests in flight), the throughput check says so and
    runs nothing, instead of reading the transient as a verdict."""
    best = with_top(planner6, policies.max_throughput(planner6, "milp"))
    race, seen = fake_race(lambda c: 1e9)
    monkeypatch.setattr(SimCheck, "race", race)
    assert SimCheck().unjudgeable(planner6, best.theta, best.latency_s) is None    # this small plan: judged
    monkeypatch.setattr(SimCheck, "requests_for", lambda self, calls: 1)          # runs stop at 16 requests
    why = SimCheck().unjudgeable(planner6, best.theta, best.latency_s)
    assert why and "not run" in why and "requests in flight" in why and "--requests" in why
    for b in (best, replace(best, top_choice=None)):
        out = simcheck.run_check(planner6, SimCheck(jobs=1), b, "throughput")
        assert not seen and out.notes[-1] == why and key(out.choice) == key(best.choice)
    assert SimCheck().unjudgeable(planner6, best.theta, math.nan) is None       # no latency to size it by: judged


def test_capacity_check_runs_the_real_simulator(planner6):
    best = policies.max_throughput(planner6, "milp")
    out = simcheck.run_check(planner6, SimCheck(calls=2000, min_requests=200, max_requests=300, jobs=1),
                             replace(best, top_choice=None), "throughput")
    row = out.checked[0]
    assert row.label == "plan" and (row.sustained_rps or row.refused_rps)
    assert row.throughput_rps > 0 and math.isfinite(row.simulated_s)
    notes = " ".join(out.notes)
    assert "simulator check (capacity)" in notes and " calls, " in notes


# ---- the tolerance check's repair: the LLM the simulator found short, provisioned for what it showed ----


@pytest.fixture(scope="module")
def planner12(models, gpus):
    # 12 GPUs: room to give small_rag's answer LLM (the bottleneck) another replica
    p = make_planner(models, gpus, 12)
    p.mixed_groups = False
    return p


def bottleneck(planner, choice):
    """The deployment whose predicted capacity carries the lowest rate in `choice`."""
    live = {m: d for m, d in planner.deployments.items() if d.calls > 0}
    return min(live, key=lambda m: choice[m].capacity_rps / live[m].calls)


def test_a_derated_planner_provisions_more_for_the_deployment_and_leaves_the_original(planner12):
    base = policies.max_throughput(planner12, "milp")
    m = bottleneck(planner12, base.choice)
    before = planner12.deployments[m].calls
    out = policies.max_throughput(planner12.derated({m: 2.0}), "milp")
    assert planner12.deployments[m].calls == before                     # the original is untouched
    assert out.choice[m].capacity_rps > base.choice[m].capacity_rps    # twice the load: more of its capacity
    assert planner12.fits(out.choice)
    for bad in ({m: 0.5}, {m: float("nan")}, {"nope": 2.0}):
        with pytest.raises(ValueError, match="derating factors"):
            planner12.derated(bad)


def short_llm_race(planner, short, factor, queue=True):
    """SimCheck.race at its seam: each LLM carries the rate its predicted capacity carries, but `short` only
    `factor` × that; past an allocation's limit the limiting LLM's calls wait (unless not `queue`)."""
    w = planner.demands[0].weight_rps
    seen = []

    def carries(c):
        return {m: c[m].capacity_rps / d.calls * w * (factor if m == short else 1.0)
                for m, d in planner.deployments.items() if d.calls > 0}

    def race(self, planner_, choices, rate, paths=None, quorum=None):
        out = []
        for c in choices:
            seen.append((key(c), rate))
            each = carries(c)
            lim = min(each.values())
            waits = {m: (5.0 if queue and rate > v else 0.0) for m, v in each.items()}
            out.append(RaceRun(rate <= lim, 10.0, min(rate, lim), waits))
        return out

    return race, seen, lambda c: min(carries(c).values())


def test_repair_gives_the_llm_the_simulator_found_short_more_and_keeps_what_holds(planner12, monkeypatch):
    best = with_top(planner12, policies.max_throughput(planner12, "milp"))
    short = bottleneck(planner12, best.choice)
    race, seen, limit = short_llm_race(planner12, short, 0.5)
    monkeypatch.setattr(SimCheck, "race", race)
    out = simcheck.run_check(planner12, SimCheck(jobs=1), best, "throughput")
    notes = " ".join(out.notes)
    assert "simulator check (repair)" in notes and "the last that won is kept" in notes, out.notes
    assert planner12.fits(out.choice)
    assert limit(out.choice) > max(limit(best.choice), limit(best.top_choice)) * 1.05
    assert out.choice[short].capacity_rps > best.choice[short].capacity_rps
    repairs = [r for r in out.checked if r.label.startswith("repair: ")]
    assert repairs and key(repairs[-1].choice) == key(out.choice)
    kept = repairs[-1]
    assert kept.sustained_rps <= limit(out.choice) * (1 + 1e-9)             # what it is said to hold, it holds
    assert kept.refused_rps is None or kept.refused_rps > limit(out.choice)
    assert out.theta <= best.theta * (1 + 1e-9)
    assert len(seen) <= 8 + SimCheck().repair_sims                          # within both budgets
    # off: the allocation the tolerance check kept stands, and the shortfall is said
    out0 = simcheck.run_check(planner12, SimCheck(jobs=1, repair_rounds=0), best, "throughput")
    assert key(out0.choice) in (key(best.choice), key(best.top_choice))
    assert "short of the" in out0.notes[-1] and "repair" not in " ".join(out0.notes)


def test_repair_needs_an_llm_that_queued(planner12, monkeypatch):
    # the same shortfall, but no LLM's calls waited in the runs: nothing names the one short, so no re-plan
    best = with_top(planner12, policies.max_throughput(planner12, "milp"))
    race, seen, limit = short_llm_race(planner12, bottleneck(planner12, best.choice), 0.5, queue=False)
    monkeypatch.setattr(SimCheck, "race", race)
    out = simcheck.run_check(planner12, SimCheck(jobs=1), best, "throughput")
    assert key(out.choice) in (key(best.choice), key(best.top_choice))
    assert not any(r.label.startswith("repair") for r in out.checked)
    assert "short of the" in out.notes[-1]


# ---- the repair's duel, at the seam: one LLM `m`, allocations told apart by their tp, each with a true limit ----


def duel(monkeypatch, limits, alts, kept_held=1 / 1.12, kept_refused=1.0, waits=None, calls=1.0, fail=None):
    """`run_repair` on a one-LLM planner: the allocation kept is tp1 (holds `kept_held`, refuses `kept_refused`);
    the MILP's re-plans give the tps in `alts` in turn (or raise `fail`); an allocation holds a rate iff it is at
    most `limits[tp]`. Returns the allocation kept, its tp, the rates judged per tp, and the note."""
    from types import SimpleNamespace

    from scepsy_hpc.allocate.milp import Candidate
    from scepsy_hpc.planning.simcheck import Checked

    def cand(tp):
        return Candidate("h100-sxm", tp, 1.0, 1, 0.0, 1.5)   # predicted to carry 1.5 rps

    judged: dict[int, list[float]] = {}

    def race(self, planner, choices, rate, paths=None, quorum=None):
        tp = choices[0]["m"].tp
        judged.setdefault(tp, []).append(rate)
        ok = rate <= limits[tp] * (1 + 1e-12)
        return [RaceRun(ok, 1.0, min(rate, limits[tp]), {"m": 0.0 if ok else 5.0}, 1000)]

    plans = iter(alts)

    def replan(planner, pol):
        if fail is not None:
            raise fail
        return SimpleNamespace(choice={"m": cand(next(plans))})

    monkeypatch.setattr(SimCheck, "race", race)
    monkeypatch.setattr(policies, "max_throughput", replan)
    planner = SimpleNamespace(demands=[SimpleNamespace(weight_rps=1.0)], progress=lambda s: None,
                              dep_of={(0, "m"): "m"}, deployments={"m": SimpleNamespace(calls=calls)},
                              derated=lambda factors: None, evaluate=lambda choice, theta: {})
    kept = Checked("plan", {"m": cand(1)}, 1.0, float("nan"), 0.0, kept_held, kept_refused)
    out, rows, note = simcheck.run_repair(planner, SimCheck(), kept, waits or {"m": 5.0}, 1.0)
    return out, out.choice["m"].tp, judged, note


def test_repair_a_tie_is_no_gain(monkeypatch):
    # the re-plan holds exactly what the allocation kept holds (0.893) and refuses a step above: kept stays
    out, tp, judged, note = duel(monkeypatch, {1: 1 / 1.12, 2: 1 / 1.12}, [2])
    assert tp == 1 and out.label == "plan"
    assert judged[2] == pytest.approx([1.0, 1.05 / 1.12])      # from kept's refusal down to a step above its hold
    assert "it refuses 0.938 rps, a rate step above the 0.893 the other holds; the allocation kept" in note


def test_repair_wins_a_step_above_what_was_held_and_climbs(monkeypatch):
    # the re-plan's limit lies between kept's hold and refusal: found at the step above the hold, then climbed
    out, tp, judged, note = duel(monkeypatch, {1: 1 / 1.12, 2: 0.96, 4: 0.5}, [2, 4])
    assert tp == 2 and out.sustained_rps == pytest.approx(1.05 / 1.12)
    assert judged[2][:2] == pytest.approx([1.0, 1.05 / 1.12])
    assert all(r < 1.0 for r in judged[2][2:])                  # the climb stops short of what it refused
    assert "the last that won is kept" in note


def test_repair_never_replaces_a_winner_with_less(monkeypatch):
    # round one's re-plan holds 0.9375; round two's holds only 0.879, below even the allocation first kept
    out, tp, judged, note = duel(monkeypatch, {1: 1 / 1.12, 2: 1.05 / 1.12, 4: 0.879}, [2, 4])
    assert tp == 2 and out.sustained_rps == pytest.approx(1.05 / 1.12)
    assert judged[4] == pytest.approx([1.05 ** 2 / 1.12])       # its one chance: the step above the winner's hold
    assert "it refuses 0.984 rps, a rate step above the 0.938 the other holds; the last that won is kept" in note


def test_repair_names_the_llm_that_queued_not_one_that_never_ran(monkeypatch):
    # an LLM with no call in the refused run has a NaN wait: it must not be taken for the one short
    out, tp, _, note = duel(monkeypatch, {1: 1 / 1.12, 2: 0.96, 4: 0.5}, [2, 4], waits={"x": float("nan"), "m": 5.0})
    assert tp == 2 and "repair: m at" in note
    out, tp, _, note = duel(monkeypatch, {1: 1 / 1.12}, [2], waits={"m": float("nan")})
    assert tp == 1 and note == ""                               # nobody queued: no re-plan, nothing said


def test_repair_of_an_llm_the_planner_never_calls_or_a_failed_re_plan_keeps_the_allocation(monkeypatch):
    from scepsy_hpc.errors import SolverError

    out, tp, judged, note = duel(monkeypatch, {1: 1 / 1.12}, [2], calls=0.0)
    assert tp == 1 and judged == {} and "the planner's programs do not call it: no re-plan" in note
    out, tp, judged, note = duel(monkeypatch, {1: 1 / 1.12}, [2], fail=SolverError("HiGHS: time limit, no solution"))
    assert tp == 1 and judged == {}
    assert "re-planning with m at 0.63× its predicted capacity failed (HiGHS: time limit, no solution)" in note
