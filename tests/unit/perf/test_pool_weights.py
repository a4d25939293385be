"""Routing among unlike replicas of one LLM (a mixed group) by capacity weight."""

from __future__ import annotations

import collections

import pytest

from scepsy_hpc.perf.engine import EnginePool, SimEngine
from scepsy_hpc.perf.events import PRIO_ENGINE, EventLoop
from scepsy_hpc.perf.fit import check_fit, estimated_capacity_rps, group_weights, replica_weights
from scepsy_hpc.perf.model import EngineConfig
from scepsy_hpc.perf.prefix import segment_blocks
from scepsy_hpc.spec.plan import LLMAlloc


def _pool(models, gpus, weights, max_num_seqs=256, n=2, **kw):
    loop = EventLoop()
    perf = check_fit(EngineConfig(models["llama-3.1-8b-instruct"], gpus["h100-sxm"], max_num_seqs=max_num_seqs), label="t")
    return loop, EnginePool([SimEngine(loop, perf, f"m/{r}", PRIO_ENGINE) for r in range(n)], weights=weights, **kw)


def test_calls_in_flight_split_in_proportion_to_the_weights(models, gpus):
    loop, pool = _pool(models, gpus, [3.0, 1.0])
    for _ in range(40):
        pool.submit("m", None, 100, 500, 0.0, lambda t, s: None)
    assert [e.outstanding for e in pool.replicas] == [30, 10]


def test_equal_weights_route_exactly_as_no_weights(models, gpus):
    seen = []
    for weights in (None, [2.0, 2.0, 2.0]):
        loop, pool = _pool(models, gpus, weights, n=3)
        order = []
        for k in range(30):
            pool.submit("m", None, 50 + 7 * k, 20 + k % 5, 0.01 * k, lambda t, s: None)
            order.append(tuple(e.outstanding for e in pool.replicas))
        seen.append(order)
    assert seen[0] == seen[1] and pool.weights is None


def test_a_full_heavy_replica_leaves_the_call_to_the_light_one(models, gpus):
    loop, pool = _pool(models, gpus, [100.0, 1.0], max_num_seqs=2)
    got = []
    for k in range(5):
        pool.submit("m", None, 100, 50, 0.0, lambda t, s: got.append(s.replica))
        if k == 2:
            assert [e.outstanding for e in pool.replicas] == [2, 1]   # the heavy one is full
    assert [e.outstanding for e in pool.replicas] == [2, 2]           # the fifth waits in the shared FIFO
    loop.run()
    assert len(got) == 5 and collections.Counter(got)[1] >= 2


def test_prefix_affinity_among_unlike_replicas_counts_slack_in_the_least_loaded_replica_calls(models, gpus):
    loop, pool = _pool(models, gpus, [4.0, 1.0])
    blocks = segment_blocks((("conv", 400), ("out", 20)))
    pool.submit("m", None, 400, 20, 0.0, lambda t, s: None, blocks)
    loop.run()
    holder = next(i for i, e in enumerate(pool.replicas) if e.pcache is not None and len(e.pcache))
    assert holder == 0            # idle: the heavy replica takes the first call
    for _ in range(4):            # load the heavy replica: (4 + 1) / 4 against 1 / 1 on the light one
        pool.submit("m", None, 100, 5000, loop.now, lambda t, s: None)
    assert [e.outstanding for e in pool.replicas] == [3, 1]
    again = segment_blocks((("conv", 400), ("out", 20), ("next", 50)))
    pool.submit("m", None, 470, 10, loop.now, lambda t, s: None, again)
    # the holder's normalised load (3 + 1) / 4 = 1 is within one call of the light one's (1 + 1) / 1 = 2
    assert [e.outstanding for e in pool.replicas] == [4, 1]


def test_weights_must_be_one_positive_number_per_replica(models, gpus):
    with pytest.raises(ValueError, match="one positive number per replica"):
        _pool(models, gpus, [1.0])
    with pytest.raises(ValueError, match="one positive number per replica"):
        _pool(models, gpus, [1.0, 0.0])


def test_routing_weights_come_from_the_plan_or_else_the_model(models, gpus):
    m, g = models["llama-3.1-8b-instruct"], gpus["h100-sxm"]
    given = [LLMAlloc(tp=2, replicas=2, capacity_rps=30.0), LLMAlloc(tp=1, gpu_frac=0.5, replicas=1, capacity_rps=9.0)]
    assert replica_weights(given, m, g) == [30.0, 30.0, 9.0]
    partial = [given[0], LLMAlloc(tp=1, gpu_frac=0.5)]
    est = group_weights(partial, m, g)
    assert est[0] > 2 * est[1] > 0 and est[0] != 30.0          # one source for all: the model's estimate
    assert replica_weights(LLMAlloc(tp=4, replicas=3), m, g) == [1.0, 1.0, 1.0]
    big = estimated_capacity_rps(check_fit(EngineConfig(m, g, tp=4)))
    small = estimated_capacity_rps(check_fit(EngineConfig(m, g, tp=1)))
    assert big > small > 0
