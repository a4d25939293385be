"""A mixed group's pool as one equivalent replica (predict.pool), checked against the simulator."""

from __future__ import annotations

import collections

import pytest

from scepsy_hpc.predict.alp import predict_cp
from scepsy_hpc.predict.inputs import ProfileSource, program_graphs, sample_mix, sample_program
from scepsy_hpc.predict.pool import pool_profile, split
from scepsy_hpc.sim import simulate
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import load_workflow
from scepsy_hpc.trace.stats import aggregate

MIXED = {"rewriter": LLMAlloc(tp=1, gpu_frac=0.25), "reranker": LLMAlloc(tp=1, gpu_frac=0.5),
         "answer": [LLMAlloc(tp=2, replicas=1), LLMAlloc(tp=1, gpu_frac=0.5, replicas=2)]}


@pytest.fixture(scope="module")
def setup(models, gpus):
    wf = load_workflow("tests/data/small_rag.yaml", models)
    seqs = sample_program(wf, 300, 0)
    src = ProfileSource(wf, models, gpus, sample_mix(seqs), None, seed=0, n_calls=1000)
    return wf, seqs, src


def test_a_pool_of_like_parts_predicts_as_those_replicas(setup):
    _, _, src = setup
    t = src.get("answer", LLMAlloc(tp=2), "h100-sxm")
    pool = pool_profile([(t, 2), (t, 3)])
    assert pool.capacity_rps == pytest.approx(t.capacity_rps)
    for x in (0.2 * t.capacity_rps, 0.5 * t.capacity_rps, 0.8 * t.capacity_rps):
        assert pool.latency_at(x) == pytest.approx(t.latency_at(x), rel=0.02)


def test_the_split_sends_light_load_to_the_fast_configuration_and_keeps_every_call(setup):
    _, _, src = setup
    fast, slow = src.get("answer", LLMAlloc(tp=2), "h100-sxm"), src.get("answer", LLMAlloc(tp=1, gpu_frac=0.5), "h100-sxm")
    parts, weights = [(fast, 1), (slow, 2)], [fast.capacity_rps, slow.capacity_rps]
    for lam in (0.5, 5.0, 15.0):
        xs = split(parts, weights, lam)
        assert xs[0] + 2 * xs[1] == pytest.approx(lam, rel=1e-6)
    light, heavy = split(parts, weights, 0.5), split(parts, weights, 18.0)
    assert light[0] / 0.5 > 0.95                      # an idle pool: the fast replica takes the calls
    assert 0.5 < heavy[0] / 18.0 < light[0] / 0.5     # near capacity the slow ones take their share


def test_a_mixed_plan_is_predicted_within_ten_percent_of_the_simulator(setup, models, gpus):
    wf, seqs, src = setup
    profiles = src.for_allocation(MIXED, "h100-sxm")
    assert profiles["answer"].workload["pool"] == "1×tp2 + 2×f0.5"
    graphs = program_graphs(seqs, profiles)
    stats = aggregate(graphs, wf.name)
    for rate in (2.0, 4.0):
        res = simulate(wf, MIXED, gpus["h100-sxm"], models, rate_rps=rate, n_requests=1500, seed=1, record_calls=True)
        pred = predict_cp(graphs, profiles, {"rewriter": 1, "reranker": 1, "answer": 3}, rate, stats)
        sim_call = res.per_llm["answer"].latency_mean_s
        assert pred.per_llm["answer"].call_latency_s == pytest.approx(sim_call, rel=0.10), rate
        assert pred.latency_s == pytest.approx(res.latency_mean_s, rel=0.10), rate
        split_ = collections.Counter(c.replica for c in res.call_records if c.llm == "answer")
        assert split_[0] > split_[1] + split_[2]          # the tp 2 replica carries most calls
        assert res.per_llm["answer"].groups == "1×tp=2 + 2×gpu_frac=0.5" and res.per_llm["answer"].replicas == 3


def test_one_price_of_a_pool_matches_its_table(setup):
    _, _, src = setup
    from scepsy_hpc.predict.alp import pooled_point
    from scepsy_hpc.predict.pool import pool_point

    fast, slow = src.get("answer", LLMAlloc(tp=2), "h100-sxm"), src.get("answer", LLMAlloc(tp=1, gpu_frac=0.5), "h100-sxm")
    parts, weights = [(fast, 1), (slow, 2)], [fast.capacity_rps, slow.capacity_rps]
    table = pool_profile(parts, weights)
    for lam in (2.0, 8.0, 14.0):
        one = pool_point(parts, weights, lam)
        whole = pooled_point(table, lam / 3, 3)
        assert one.latency_mean_s == pytest.approx(whole.latency_mean_s, rel=0.08), lam
    assert pool_point(parts, weights, 10 * table.capacity_rps * 3) is None
