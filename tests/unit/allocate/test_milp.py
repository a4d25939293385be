"""The allocation MILP against exhaustive search on small random instances."""

from __future__ import annotations

import functools
import itertools
import random

import pytest

from scepsy_hpc.allocate import milp
from scepsy_hpc.allocate.milp import Candidate, instance_bound, shared_gpus_needed, solve, solve_max_rate
from scepsy_hpc.errors import InfeasibleError, SolverError


@functools.lru_cache(maxsize=None)
def min_bins(n1: int, n2: int, n3: int) -> int:
    """Fewest unit bins for n_k items of size k/4, by exhaustive search over bin contents."""
    if n1 == n2 == n3 == 0:
        return 0
    best = 10 ** 9
    for a3 in range(min(n3, 1) + 1):  # one bin: at most one 3/4 ...
        for a2 in range(min(n2, 2) + 1):
            for a1 in range(min(n1, 4) + 1):
                if 3 * a3 + 2 * a2 + a1 > 4 or a3 + a2 + a1 == 0:
                    continue
                best = min(best, 1 + min_bins(n1 - a1, n2 - a2, n3 - a3))
    return best


@pytest.mark.parametrize("n1,n2,n3", list(itertools.product(range(6), range(5), range(4))))
def test_quarter_packing_formula_is_exact(n1, n2, n3):
    choice = {}
    for k, n in ((1, n1), (2, n2), (3, n3)):
        if n:
            choice[f"m{k}"] = Candidate("g", 1, k / 4, n, 0.0)
    assert shared_gpus_needed(choice).get("g", 0) == min_bins(n1, n2, n3)


def fitting_choices(cands, budget):
    """Every one-candidate-per-LLM choice whose whole and packed shared GPUs fit the budget."""
    names = list(cands)
    for combo in itertools.product(*(cands[m] for m in names)):
        choice = dict(zip(names, combo))
        used = shared_gpus_needed(choice)
        for c in combo:
            used[c.gpu] = used.get(c.gpu, 0) + c.whole_gpus
        if all(used[g] <= budget.get(g, 0) for g in used):
            yield choice


def brute(cands, budget):
    return min((sum(c.cost_s for c in ch.values()) for ch in fitting_choices(cands, budget)), default=None)


def random_instance(rng):
    cands = {}
    for m in range(rng.randint(2, 4)):
        cs = []
        for _ in range(rng.randint(1, 5)):
            tp = rng.choice((1, 1, 2, 4))
            f = 1.0 if tp > 1 else rng.choice((0.25, 0.5, 0.75, 1.0, 1.0))
            cs.append(Candidate(rng.choice(("a", "b")), tp, f, rng.randint(1, 3), round(rng.uniform(1, 20), 3)))
        cands[f"m{m}"] = cs
    return cands, {"a": rng.randint(0, 8), "b": rng.randint(0, 4)}


@pytest.mark.parametrize("seed", range(60))
def test_milp_matches_exhaustive_search(seed):
    rng = random.Random(seed)
    cands, budget = random_instance(rng)
    want = brute(cands, budget)
    if want is None:
        with pytest.raises(InfeasibleError) as e:
            solve(cands, budget)
        assert "GPUs" in str(e.value)
        return
    res = solve(cands, budget)
    assert res.objective_s == pytest.approx(want)
    used = res.gpus_used()
    assert all(used[g] <= budget[g] for g in used)  # never more GPUs than exist
    assert set(res.choice) == set(cands)  # every LLM served
    assert shared_gpus_needed(res.choice).get("a", 0) <= res.shared_gpus.get("a", 0)


def test_no_candidate_is_a_clear_error():
    with pytest.raises(InfeasibleError) as e:
        solve({"big": [], "small": [Candidate("a", 1, 1.0, 1, 1.0)]}, {"a": 8})
    assert "big" in str(e.value) and "small" not in str(e.value)


def solved_unless_infeasible(want, solver, *args):
    """solver(*args) where exhaustive search found an answer (`want`); else it must raise InfeasibleError."""
    if want is None:
        with pytest.raises(InfeasibleError):
            solver(*args)
        return None
    return solver(*args)


def brute_rate(cands, budget, calls):
    return max((min(c.capacity_rps / calls[m] for m, c in ch.items()) for ch in fitting_choices(cands, budget)), default=None)


@pytest.mark.parametrize("seed", range(40))
def test_max_rate_milp_matches_exhaustive_search(seed):
    rng = random.Random(1000 + seed)
    cands, budget = random_instance(rng)
    cands = {m: [Candidate(c.gpu, c.tp, c.gpu_frac, c.replicas, 0.0, round(rng.uniform(0.5, 10) * c.gpus, 3)) for c in cs]
             for m, cs in cands.items()}
    calls = {m: rng.uniform(0.5, 20) for m in cands}
    want = brute_rate(cands, budget, calls)
    out = solved_unless_infeasible(want, solve_max_rate, cands, budget, calls)
    if out is None:
        return
    theta, res = out
    assert theta == pytest.approx(want, rel=1e-6)
    assert all(c.capacity_rps >= calls[m] * theta * (1 - 1e-6) for m, c in res.choice.items())  # every LLM carries its load
    used = res.gpus_used()
    assert all(used[g] <= budget[g] for g in used)


def replica_candidates(rng, n_gpus, gaps=False):
    """Per LLM 1–3 configurations, each at every replica count that fits `n_gpus` (κ = r·μ), as the
    planner's capacity candidates are; `gaps`: some counts left out (pruned as dominated)."""
    cands = {}
    for m in range(rng.randint(2, 3)):
        cs = []
        for tp, f in rng.sample([(1, 0.25), (1, 0.5), (1, 0.75), (1, 1.0), (2, 1.0), (4, 1.0)], rng.randint(1, 3)):
            mu = round(rng.uniform(0.5, 10) * tp * f, 3)
            rs = [r for r in range(1, int(n_gpus / (tp * f)) + 1) if not (gaps and r > 1 and rng.random() < 0.3)]
            cs += [Candidate("a", tp, f, r, 0.0, r * mu) for r in rs]
        cands[f"m{m}"] = cs
    return cands, {"a": n_gpus}, {m: rng.uniform(0.5, 20) for m in cands}


@pytest.mark.parametrize("seed", range(30))
def test_compact_max_rate_is_the_list_forms_optimum(seed, monkeypatch):
    """The compact form (one count variable per configuration) reaches the list form's θ, which exhaustive
    search confirms; with counts left out of the list it may do better (a left-out count is still a valid
    allocation), never worse. Its choice is one configuration per LLM at a count within the list's range."""
    rng = random.Random(3000 + seed)
    gaps = seed % 3 == 0
    cands, budget, calls = replica_candidates(rng, rng.randint(2, 6), gaps)
    want = brute_rate(cands, budget, calls)
    monkeypatch.setattr(milp, "COMPACT_ABOVE", 10 ** 9)
    listed = solved_unless_infeasible(want, solve_max_rate, cands, budget, calls)
    monkeypatch.setattr(milp, "COMPACT_ABOVE", 0)
    compact = solved_unless_infeasible(want, solve_max_rate, cands, budget, calls)
    if listed is None:
        return
    (theta_l, _), (theta_c, res) = listed, compact
    assert theta_l == pytest.approx(want, rel=1e-6)
    if gaps:
        assert theta_c >= theta_l * (1 - 1e-6)
    else:
        assert theta_c == pytest.approx(theta_l, rel=1e-6)
    for m, c in res.choice.items():
        kin = [k for k in cands[m] if (k.tp, k.gpu_frac) == (c.tp, c.gpu_frac)]
        assert kin and 1 <= c.replicas <= max(k.replicas for k in kin) and not c.more
        assert c.capacity_rps == pytest.approx(kin[0].capacity_rps / kin[0].replicas * c.replicas)
        assert c.capacity_rps >= calls[m] * theta_c * (1 - 1e-6)
    used = res.gpus_used()
    assert all(used[g] <= budget[g] for g in used)


def test_compact_max_rate_keeps_the_domain_caps_and_llms_without_calls(monkeypatch):
    """With NVLink domain caps (constraint (6)) the compact form honours them and reaches at least the list
    form's θ: it may do better, since the list's pruning by GPUs ignores the caps (here tp1 × 2 was pruned
    as dominated by tp2 × 1, which no domain of 2 can hold). An LLM with no calls keeps its one candidate,
    and the choice is the list's own candidate where the list has that count."""
    cands = {"m": [Candidate("a", 1, 1.0, 1, 0.0, 1.0), Candidate("a", 2, 1.0, 1, 0.0, 2.5),
                   Candidate("a", 1, 1.0, 3, 0.0, 3.0)],
             "idle": [Candidate("a", 1, 0.25, 1, 0.0, 0.0)]}
    calls = {"m": 1.0}
    for caps, want in ((None, 2.5), ({2: 0}, 2.0)):
        monkeypatch.setattr(milp, "COMPACT_ABOVE", 10 ** 9)
        theta_l, _ = solve_max_rate(cands, {"a": 3}, calls, domain_caps=caps)
        monkeypatch.setattr(milp, "COMPACT_ABOVE", 0)
        theta_c, res = solve_max_rate(cands, {"a": 3}, calls, domain_caps=caps)
        assert theta_c == pytest.approx(want) and theta_c >= theta_l * (1 - 1e-9)
        assert res.choice["idle"] == cands["idle"][0]
        if caps:
            assert res.choice["m"].tp == 1 and res.choice["m"].replicas == 2      # a count the list did not have
        else:
            assert res.choice["m"] is cands["m"][1]                               # the list's own candidate


def test_max_rate_on_a_thousand_gpus_is_solved_in_its_compact_form():
    """32 LLMs on 1,024 GPUs: every replica count of every configuration is ~90,000 candidates, which the list
    form did not get through (HiGHS 'Not Solved' after 129 s, its 30 s limit passed). The compact form solves
    it: an allocation that fits, carries θ, and carries at least as much as the even split."""
    rng = random.Random(7)
    n = 1024
    cands, calls = {}, {}
    for m in range(32):
        cs = []
        for tp, f in [(1, 0.25), (1, 0.5), (1, 0.75), (1, 1.0), (2, 1.0), (4, 1.0), (8, 1.0)]:
            mu = rng.uniform(0.8, 1.2) * (tp * f) ** 0.9
            cs += [Candidate("a", tp, f, r, 0.0, r * mu) for r in range(1, int(n / (tp * f)) + 1)]
        cands[f"m{m:02d}"], calls[f"m{m:02d}"] = cs, rng.uniform(1, 10)
    assert sum(map(len, cands.values())) > milp.COMPACT_ABOVE
    theta, res = solve_max_rate(cands, {"a": n}, calls, time_limit_s=120.0)
    assert res.status == "optimal"
    used = res.gpus_used()
    assert used["a"] <= n
    assert all(c.capacity_rps >= calls[m] * theta * (1 - 1e-6) for m, c in res.choice.items())
    even = min(next(c for c in cands[m] if (c.tp, c.gpu_frac, c.replicas) == (1, 1.0, n // 32)).capacity_rps / calls[m]
               for m in cands)
    assert theta >= even


def random_instances(rng):
    """Per LLM 1–3 single-instance configurations (replicas = 1) with a capacity, on one GPU type."""
    cands = {}
    for m in range(rng.randint(2, 3)):
        cs = set()
        for _ in range(rng.randint(1, 3)):
            tp = rng.choice((1, 1, 1, 2))
            f = 1.0 if tp > 1 else rng.choice((0.25, 0.5, 0.75, 1.0))
            cs.add(Candidate("a", tp, f, 1, 0.0, round(rng.uniform(0.5, 10) * tp * f, 3)))
        cands[f"m{m}"] = sorted(cs, key=lambda c: (c.tp, c.gpu_frac))
    return cands, {"a": rng.randint(2, 5)}, {m: rng.uniform(0.5, 20) for m in cands}


def brute_instances(cands, budget):
    """Best θ over every multiset of instances (mixed configurations per LLM) that packs in budget."""
    n = budget["a"]
    per_llm = {}
    for m, cs in cands.items():
        ranges = [range(int(n / c.gpus) + 1) for c in cs]
        per_llm[m] = [k for k in itertools.product(*ranges) if 0 < sum(k) and sum(x * c.gpus for x, c in zip(k, cs)) <= n]
    names = list(cands)
    for combo in itertools.product(*(per_llm[m] for m in names)):
        whole, q = 0, [0, 0, 0, 0]
        for m, k in zip(names, combo):
            for x, c in zip(k, cands[m]):
                if c.quarter:
                    q[c.quarter] += x
                else:
                    whole += x * c.tp
        if whole + min_bins(q[1], q[2], q[3]) <= n:
            yield {m: dict(zip(cands[m], k)) for m, k in zip(names, combo)}


@pytest.mark.parametrize("seed", range(30))
def test_instance_bound_matches_exhaustive_search(seed):
    rng = random.Random(2000 + seed)
    cands, budget, calls = random_instances(rng)
    rate = lambda mix: min(sum(x * c.capacity_rps for c, x in mix[m].items()) / calls[m] for m in mix)  # noqa: E731
    want = max((rate(mix) for mix in brute_instances(cands, budget)), default=None)
    out = solved_unless_infeasible(want, instance_bound, cands, budget, calls)
    if out is None:
        return
    theta, counts = out
    assert theta == pytest.approx(want, rel=1e-6)
    assert rate(counts) == pytest.approx(theta, rel=1e-6)
    # it bounds the one-configuration-per-LLM optimum over every replica count
    homog = {m: [Candidate("a", c.tp, c.gpu_frac, r, 0.0, r * c.capacity_rps)
                 for c in cs for r in range(1, int(budget["a"] / c.gpus) + 1)] for m, cs in cands.items()}
    try:
        one, _ = solve_max_rate(homog, budget, calls)
    except InfeasibleError:
        return
    assert one <= theta * (1 + 1e-6)


def test_instance_bound_mixes_configurations_where_one_per_llm_leaves_gpus_idle():
    """5 GPUs: A needs one tp-2 instance; B's best use of the other 3 is a tp-2 plus a tp-1
    instance, which no single configuration with replicas expresses (3 × tp1 or 1 × tp2)."""
    a = [Candidate("a", 2, 1.0, 1, 0.0, 10.0)]
    b = [Candidate("a", 1, 1.0, 1, 0.0, 0.25), Candidate("a", 2, 1.0, 1, 0.0, 1.28)]
    theta, counts = instance_bound({"A": a, "B": b}, {"a": 5}, {"A": 1.0, "B": 1.0})
    assert theta == pytest.approx(1.53)
    assert counts["B"] == {b[0]: 1, b[1]: 1} and counts["A"] == {a[0]: 1}
    one, _ = solve_max_rate({"A": a, "B": [Candidate("a", 1, 1.0, 3, 0.0, 0.75), b[1]]}, {"a": 5}, {"A": 1.0, "B": 1.0})
    assert one == pytest.approx(1.28)


def test_instance_bound_takes_single_instances():
    with pytest.raises(ValueError, match="replicas = 1"):
        instance_bound({"m": [Candidate("a", 1, 1.0, 2, 0.0, 1.0)]}, {"a": 4}, {"m": 1.0})


def test_time_limit_reports_feasible_not_optimal():
    """A hard instance stopped at a tiny time limit comes back as 'feasible' (or optimal if HiGHS is fast enough),
    never as a silent optimum claim: status and time_limit_hit agree; with no incumbent by then it is
    a SolverError that says to raise the limit (which of the three depends on the machine's speed)."""
    rng = random.Random(7)
    cands = {f"m{k}": [Candidate("a", tp, 1.0, r, rng.uniform(1, 50) / (tp * r) ** 0.5) for tp in (1, 2, 4) for r in range(1, 30)]
             for k in range(24)}
    try:
        res = solve(cands, {"a": 300}, time_limit_s=0.05)
    except SolverError as e:  # a slow or loaded machine: no incumbent yet at the limit, and we say so
        assert "no solution" in str(e) and "raise the time limit (0.05 s)" in str(e)
        return
    assert res.status in ("optimal", "feasible")
    assert res.time_limit_hit == (res.status == "feasible")


def shares(choice):
    return {m: c.gpus for m, c in choice.items()}


def far(choice, excluded, delta):
    """Some LLM's GPU share differs by at least `delta` from its share in `excluded`."""
    return any(abs(c.gpus - excluded[m]) >= delta - 1e-9 for m, c in choice.items())


@pytest.mark.parametrize("seed", range(40))
def test_excluded_splits_give_the_next_best_other_split(seed):
    """Constraint (7): the optimum over allocations that move some LLM's share by ≥ δ from every
    excluded split, against exhaustive search; chaining it lists distinct splits best first."""
    rng = random.Random(1000 + seed)
    cands, budget = random_instance(rng)
    if brute(cands, budget) is None:
        return
    delta = rng.choice((0.5, 1.0, 2.0))
    excluded = [shares(solve(cands, budget).choice)]
    last = -1.0
    for _ in range(3):
        want = min((sum(c.cost_s for c in ch.values()) for ch in fitting_choices(cands, budget)
                    if all(far(ch, e, delta) for e in excluded)), default=None)
        if want is None:
            with pytest.raises(InfeasibleError):
                solve(cands, budget, exclude=excluded, delta=delta)
            return
        res = solve(cands, budget, exclude=excluded, delta=delta)
        assert res.objective_s == pytest.approx(want)
        assert res.objective_s >= last - 1e-9
        assert all(far(res.choice, e, delta) for e in excluded)
        last = res.objective_s
        excluded.append(shares(res.choice))
