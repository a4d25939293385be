"""The MILP with instance counts per configuration (mixed groups) against exhaustive search on small cases."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from scepsy_hpc.allocate.milp import Candidate, instance_bound, mixed_candidate, shared_gpus_needed, solve_counts
from scepsy_hpc.allocate.planner import used_gpus
from scepsy_hpc.spec.fractions import quarter_gpus

G = "h100-sxm"


def _inst(tp, frac, mu, cost=0.0):
    return Candidate(G, tp, frac, 1, cost, mu)


def _gpus(instances, combo):
    whole, q = 0, [0, 0, 0, 0]
    for cs, counts in zip(instances.values(), combo):
        for c, k in zip(cs, counts):
            if c.gpu_frac >= 1.0:
                whole += c.tp * k
            else:
                q[c.quarter] += k
    return whole + quarter_gpus(q[1], q[2], q[3])


def _combos(instances, n_gpus):
    """Every count vector: each configuration from 0 to as many as the GPUs hold alone."""
    per = [[v for v in itertools.product(*[range(int(n_gpus // c.gpus) + 1) for c in cs]) if sum(v)]
           for cs in instances.values()]
    return itertools.product(*per)


def _cases(seed, n):
    rng = random.Random(seed)
    shapes = [(1, 0.25), (1, 0.5), (1, 0.75), (1, 1.0), (2, 1.0), (4, 1.0)]
    for _ in range(n):
        inst = {}
        for m in ("a", "b"):
            picks = rng.sample(shapes, 2)
            # capacity grows with the share, less than linearly (bigger instances are less efficient per GPU)
            inst[m] = [_inst(tp, f, round((tp * f) ** rng.uniform(0.7, 1.0) * rng.uniform(2, 6), 3),
                             round(rng.uniform(0.1, 3.0), 3)) for tp, f in sorted(picks)]
        yield inst, {"a": rng.uniform(0.5, 3), "b": rng.uniform(0.5, 3)}, rng.randint(2, 4)


@pytest.mark.parametrize("seed", range(6))
def test_the_instance_bound_equals_exhaustive_search(seed):
    for instances, calls, n_gpus in _cases(seed, 3):
        theta, counts = instance_bound(instances, {G: n_gpus}, calls)
        best = 0.0
        for combo in _combos(instances, n_gpus):
            if _gpus(instances, combo) <= n_gpus:
                caps = [sum(c.capacity_rps * k for c, k in zip(cs, v)) for cs, v in zip(instances.values(), combo)]
                best = max(best, min(cap / calls[m] for cap, m in zip(caps, instances)))
        assert theta == pytest.approx(best, rel=1e-6), (instances, calls, n_gpus)
        got = {m: mixed_candidate(counts[m]) for m in instances}
        assert used_gpus(got) <= n_gpus


@pytest.mark.parametrize("seed", range(6))
def test_the_least_cost_counts_at_a_rate_equal_exhaustive_search(seed):
    for instances, calls, n_gpus in _cases(100 + seed, 3):
        top, _ = instance_bound(instances, {G: n_gpus}, calls)
        theta = 0.8 * top
        choice, res = solve_counts(instances, {G: n_gpus}, calls, theta)
        best = math.inf
        for combo in _combos(instances, n_gpus):
            if _gpus(instances, combo) > n_gpus:
                continue
            ok = all(sum(c.capacity_rps * k for c, k in zip(cs, v)) >= calls[m] * theta - 1e-9
                     for (m, cs), v in zip(instances.items(), combo))
            if ok:
                best = min(best, sum(c.cost_s * k for cs, v in zip(instances.values(), combo) for c, k in zip(cs, v)))
        assert res.objective_s == pytest.approx(best, rel=1e-6, abs=1e-9)
        assert sum(c.cost_s for c in choice.values()) == pytest.approx(best, rel=1e-6, abs=1e-9)
        for m, c in choice.items():
            assert c.capacity_rps >= calls[m] * theta - 1e-6
        assert used_gpus(choice) <= n_gpus


def test_a_mixed_candidate_counts_every_group_in_gpus_packing_and_identity():
    a4, a1, q2 = _inst(4, 1.0, 10.0), _inst(1, 1.0, 3.0), _inst(1, 0.5, 1.2)
    c = mixed_candidate({a4: 1, a1: 2, q2: 3})
    assert (c.tp, c.replicas, c.total_replicas) == (4, 1, 6)
    assert [(g.tp, g.gpu_frac, g.replicas) for g in c.groups] == [(4, 1.0, 1), (1, 1.0, 2), (1, 0.5, 3)]
    assert c.capacity_rps == pytest.approx(10 + 6 + 3.6) and c.whole_gpus == 6 and c.gpus == pytest.approx(7.5)
    assert c.quarter_units() == 6 and c.large_units() == pytest.approx(1.5) and c.tp_groups(2) == 2
    assert shared_gpus_needed({"m": c}) == {G: 2} and used_gpus({"m": c}) == 8
    assert c.kind == (0, 2)
    with pytest.raises(ValueError, match="at least one instance"):
        mixed_candidate({a4: 0})


def test_a_mixed_candidates_plan_entry_weights_every_configuration_by_its_own_capacity():
    """Every group of a mixed group gets its per-replica capacity as its routing weight (the first one
    too: a missing weight would send the whole LLM to the roofline estimate instead of the profiles')."""
    from scepsy_hpc.allocate.allocation import as_entry
    from scepsy_hpc.allocate.milp import Candidate, mixed_candidate

    big = Candidate("h100-sxm", 1, 1.0, 1, 0.0, 24.0)
    small = Candidate("h100-sxm", 1, 0.25, 1, 0.0, 8.0)
    c = mixed_candidate({big: 4, small: 1})
    assert [g.capacity_rps for g in c.groups] == [96.0, 8.0] and c.capacity_rps == 104.0
    entry = as_entry(c)
    assert [(e.gpu_frac, e.replicas, e.capacity_rps) for e in entry] == [(1.0, 4, 24.0), (0.25, 1, 8.0)]
