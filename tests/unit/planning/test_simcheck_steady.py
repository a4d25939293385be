"""The simulator check in steady state (planning.simcheck: SimCheck.needs_steady, SimCheck.steady,
run_steady_check): when a fixed-length run would not leave the transient, each allocation is
measured over a window after a warm-up scaled to latency × rate, within a budget of simulated
calls, and the notes say what was not checked and which latency figure the plan trusts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from scepsy_hpc.allocate import policies
from scepsy_hpc.allocate.milp import choice_key
from scepsy_hpc.allocate.planner import Demand, Planner
from scepsy_hpc.planning import policy, simcheck
from scepsy_hpc.planning.simcheck import SimCheck, SteadyRun, run_check
from scepsy_hpc.predict.inputs import sample_mix, sample_program
from scepsy_hpc.sim.core import simulate
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.source import parse_yaml
from scepsy_hpc.spec.workflow import parse_workflow

SMALL = (Path(__file__).resolve().parents[2] / "data" / "small_rag.yaml").read_text()


@pytest.fixture(scope="module")
def planner6(models, gpus):
    data, smap = parse_yaml(SMALL, "small.yaml")
    wf = parse_workflow(data, smap, models)
    seqs = sample_program(wf, 300, 0)
    return Planner([Demand(wf, wf.target.throughput_rps, sample_mix(seqs), seqs)], models, gpus, "h100-sxm", 6,
                   max_tp=4, n_calls=500)


@pytest.fixture(scope="module")
def best6(planner6):
    return policies.plan_at(planner6, "milp", 1.0)


def test_small_workflows_keep_the_fixed_length_run(planner6, best6):
    check = SimCheck()
    assert not check.needs_steady(planner6, 1.0, best6.latency_s)
    # the same plan with latencies 1,000× longer would keep λ·L requests in flight: the run is too short
    assert check.needs_steady(planner6, 1.0, best6.latency_s * 1000)


def test_steady_latency_matches_a_long_run(planner6, best6):
    """Little's law over the window reads the mean latency a long run measures after its fill."""
    check = SimCheck(seed=3)
    run = check.steady(planner6, best6.choice, 1.0, best6.latency_s)
    assert run.settled and abs(run.growth) < 0.05
    assert run.window_s >= check.steady_window * best6.latency_s
    dm = planner6.demands[0]
    alloc = {m: LLMAlloc(tp=c.tp, gpu_frac=c.gpu_frac, replicas=c.replicas) for m, c in best6.choice.items()}
    long = simulate(dm.wf, alloc, planner6.gpus["h100-sxm"], planner6.models, rate_rps=dm.weight_rps,
                    n_requests=4000, seed=11, warmup_frac=0.2)
    assert run.latency_s == pytest.approx(long.latency_mean_s, rel=0.1)
    assert run.throughput_rps == pytest.approx(dm.weight_rps, rel=0.15)


def fake_steady(latency_of, calls=100_000):
    seen = []

    def steady(self, planner, choice, theta, latency_s, confirm_below=float("inf"), first=None):
        assert first is None   # the fakes run in turn: SimCheck(jobs=1)
        seen.append(choice_key(choice))
        lat = latency_of(len(seen))
        return SteadyRun(lat, theta, 1.5 * lat, lat, 1000, calls, 0.0, True)

    return steady, seen


def steady_best(planner, best):
    """`best` as if its requests took 1,000× longer: the check must measure in steady state."""
    return replace(best, predictions={k: replace(p, latency_s=p.latency_s * 1000) for k, p in best.predictions.items()})


def test_budget_bounds_the_allocations_simulated_and_the_note_says_so(planner6, best6, monkeypatch):
    steady, seen = fake_steady(lambda i: 100.0, calls=100_000)
    monkeypatch.setattr(SimCheck, "steady", steady)
    out = run_check(planner6, SimCheck(jobs=1, steady_calls=250_000), steady_best(planner6, best6))
    assert len(seen) == 2 and len(out.checked) == 2      # a third run would pass the budget: not started
    assert seen[0] == choice_key(best6.choice)
    assert any("were not" in n and "250000" in n for n in out.notes), out.notes
    assert all(c.steady is not None for c in out.checked)
    # the optimum is always simulated, even when one run spends the whole budget
    steady, seen = fake_steady(lambda i: 100.0, calls=10 ** 9)
    monkeypatch.setattr(SimCheck, "steady", steady)
    out = run_check(planner6, SimCheck(jobs=1), steady_best(planner6, best6))
    assert len(seen) == 1 and choice_key(out.choice) == choice_key(best6.choice)


def test_a_faster_alternative_is_kept_past_the_margin(planner6, best6, monkeypatch):
    steady, seen = fake_steady(lambda i: 100.0 if i == 1 else 80.0)
    monkeypatch.setattr(SimCheck, "steady", steady)
    out = run_check(planner6, SimCheck(jobs=1, steady_calls=300_000), steady_best(planner6, best6))
    assert len(seen) == 3
    assert choice_key(out.choice) != choice_key(best6.choice)
    assert any("is kept" in n for n in out.notes)


def test_the_plan_says_which_latency_it_trusts(planner6, best6, monkeypatch):
    best = steady_best(planner6, best6)
    far = best.latency_s * 2.5
    steady, _ = fake_steady(lambda i: far)
    monkeypatch.setattr(SimCheck, "steady", steady)
    out = run_check(planner6, SimCheck(jobs=1, steady_calls=1), best)
    assert any("trust the simulation" in n for n in out.notes), out.notes
    close = best.latency_s * 1.05
    steady, _ = fake_steady(lambda i: close)
    monkeypatch.setattr(SimCheck, "steady", steady)
    out = run_check(planner6, SimCheck(jobs=1, steady_calls=1), best)
    assert not any("trust the simulation" in n for n in out.notes), out.notes


def test_policy_run_goes_through_the_steady_check_at_scale(planner6, best6, monkeypatch):
    steady, seen = fake_steady(lambda i: 100.0)
    monkeypatch.setattr(SimCheck, "steady", steady)
    monkeypatch.setattr(SimCheck, "needs_steady", lambda self, p, theta, lat: True)
    out = policy.checked(planner6, SimCheck(jobs=1, steady_calls=1), "milp", best6)
    assert len(seen) == 1 and out.checked[0].steady is not None


def test_an_unsettled_run_is_run_again_unless_already_slower(planner6, best6, monkeypatch):
    """A run still filling reads low: it is made again from its measured latency, except for an
    alternative that already reads slower than the optimum."""
    runs = []

    def job(self, planner, choice, theta, latency_s):
        return ("job", theta, latency_s)

    def once(job):
        _, theta, latency_s = job
        runs.append(latency_s)
        return SteadyRun(50.0, theta, 1.5 * latency_s, latency_s, 1000, 1000, 0.2, False)

    monkeypatch.setattr(SimCheck, "steady_job", job)
    monkeypatch.setattr(simcheck, "_steady_run", once)
    check = SimCheck()
    got = check.steady(planner6, best6.choice, 1.0, 10.0)
    assert runs == [10.0, 50.0] and got.calls == 2000
    runs.clear()
    check.steady(planner6, best6.choice, 1.0, 10.0, confirm_below=40.0)
    assert runs == [10.0]


def test_an_unsettled_kept_run_is_called_a_lower_bound(planner6, best6, monkeypatch):
    def steady(self, planner, choice, theta, latency_s, confirm_below=float("inf"), first=None):
        return SteadyRun(latency_s, theta, 1.0, 1.0, 100, 10 ** 9, 0.2, False)

    monkeypatch.setattr(SimCheck, "steady", steady)
    out = run_check(planner6, SimCheck(jobs=1), steady_best(planner6, best6))
    assert any("did not settle" in n and "20.0%" in n and "lower bound" in n for n in out.notes), out.notes
    assert out.checked[0].to_dict()["steady_state"]["settled"] is False


def test_runs_side_by_side_read_as_runs_in_turn(planner6, best6):
    check = SimCheck(seed=5, jobs=2)
    alt = policies.equal(planner6, 1.0).choice
    jobs = [check.steady_job(planner6, c, 1.0, best6.latency_s) for c in (best6.choice, alt)]
    both = simcheck._side_by_side(check, jobs)
    assert both is not None and both == [simcheck._steady_run(j) for j in jobs]
    assert simcheck._side_by_side(SimCheck(jobs=1), jobs) is None


def test_caps_the_optimum_already_meets_are_not_solved_and_the_shortlist_is_unchanged(planner6, best6, monkeypatch):
    """A MILP that only lowers caps the optimum already meets finds the optimum again: skipping it
    leaves the shortlist as solving every one of them would make it."""
    from scepsy_hpc.allocate import milp as milp_mod

    check = SimCheck(caps=(0.85, 0.8, 0.7))
    loads = planner6.loads(best6.theta)
    util = {m: loads[m] / c.capacity_rps for m, c in best6.choice.items()}
    assert any(u <= 0.7 for u in util.values()), util   # some entry meets every cap: its MILP is skipped
    solved = []
    real = milp_mod.solve

    def counting(*a, **kw):
        solved.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(milp_mod, "solve", counting)
    got = [(label, choice_key(c)) for label, c in simcheck.shortlist(planner6, best6, check)]
    n_skipping = len(solved)
    # every MILP solved, as before: the cap runs, each LLM at the lowest cap, the splits
    paths = {i: best6.predictions[dm.wf.name].paths for i, dm in enumerate(planner6.demands)}
    budget = {planner6.gpu_name: planner6.n_gpus}

    def solve(cands):
        return choice_key(real(cands, budget, time_limit_s=30, gap=planner6.gap, domain_caps=planner6.domain_caps,
                               delta=check.delta).choice)

    caps = [c for c in check.caps if c < planner6.max_util]
    every = [solve(planner6.latency_candidates(best6.theta, paths, max_util=c)) for c in caps]
    loose = planner6.latency_candidates(best6.theta, paths)
    tight = planner6.latency_candidates(best6.theta, paths, max_util=min(caps))
    every += [solve({m: (tight[m] if m == d else cs) for m, cs in loose.items()}) for d in planner6.deployments]
    keys = {k for _, k in got}
    assert set(every) <= keys | {choice_key(best6.choice)}
    for d, u in util.items():   # a skipped one is the optimum itself
        if u <= min(caps):
            assert solve({m: (tight[m] if m == d else cs) for m, cs in loose.items()}) == choice_key(best6.choice)
    assert n_skipping < len(every) + check.alternatives


def test_the_first_alternative_run_is_the_likeliest_to_win(planner6, best6, monkeypatch):
    """The steady-state check runs, after the optimum, the shortlist entry with the lowest predicted
    latency among the next few; an alternative that has not settled cannot displace the optimum."""
    steady, seen = fake_steady(lambda i: 100.0, calls=100_000)
    monkeypatch.setattr(SimCheck, "steady", steady)
    best = steady_best(planner6, best6)
    check = SimCheck(jobs=1, steady_calls=200_000)
    entries = simcheck.shortlist(planner6, best, check)[1:1 + simcheck.LOOKAHEAD]
    assert len(entries) >= 2
    pred = {choice_key(c): sum(p.latency_s for p in planner6.evaluate(c, best.theta).values()) for _, c in entries}
    run_check(planner6, check, best)
    assert len(seen) == 2 and pred[seen[1]] == min(pred.values())

    def unsettled(self, planner, choice, theta, latency_s, confirm_below=float("inf"), first=None):
        opt = choice_key(choice) == choice_key(best.choice)
        return SteadyRun(100.0 if opt else 10.0, theta, 1.0, 1.0, 100, 1000, 0.0 if opt else 0.3, opt)

    monkeypatch.setattr(SimCheck, "steady", unsettled)
    out = run_check(planner6, SimCheck(jobs=1), best)
    assert len(out.checked) > 1 and choice_key(out.choice) == choice_key(best.choice)
