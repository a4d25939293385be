"""The simulator's request cap (`simulate(max_requests=N)`): a gateway that lets at most N workflow requests be
in flight, later ones holding FIFO until one ends. Derived by hand on a short workflow; checked to change
nothing when it never binds; and measured where it matters: a cache-reusing deployment past capacity."""

from __future__ import annotations

import pytest

from scepsy_hpc.sim import simulate
from scepsy_hpc.spec.catalog import config_dir
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import load_workflow, workflow_from_text

CHAT = """
name: chat
llms: {agent: {model: llama-3.1-8b-instruct}}
program:
  - {call: agent, context: c, shared_prefix_tokens: 256, prompt_tokens: 400, output_tokens: 40}
  - {call: agent, context: c, prompt_tokens: 100, output_tokens: 40}
"""


def _chat(models, gpus, arrivals, **kw):
    wf = workflow_from_text(CHAT, models)
    return simulate(wf, {"agent": LLMAlloc()}, gpus["h100-sxm"], models, arrivals=arrivals, warmup_frac=0.0,
                    record_calls=True, **kw)


def _in_flight_peak(records) -> int:
    edges = sorted([(r.t_start, 1) for r in records] + [(r.t_end, -1) for r in records], key=lambda e: (e[0], e[1]))
    peak = now = 0
    for _, d in edges:
        now += d
        peak = max(peak, now)
    return peak


def test_a_cap_that_never_binds_changes_nothing(models, gpus):
    arrivals = [0.05 * i for i in range(40)]
    free, capped = _chat(models, gpus, arrivals), _chat(models, gpus, arrivals, max_requests=1000)
    assert capped.call_records == free.call_records
    assert (capped.throughput_rps, capped.latency_mean_s, capped.latency_p99_s) == \
        (free.throughput_rps, free.latency_mean_s, free.latency_p99_s)
    assert capped.held_requests == 0 and capped.held_mean_s == 0.0 and capped.max_requests == 1000
    assert free.max_requests is None
    assert all(r.t_start == r.t_arrive for r in free.request_records)


def test_a_cap_of_one_serves_requests_one_after_another_in_arrival_order(models, gpus):
    arrivals = [0.0, 0.01, 0.02, 100.0]
    res = _chat(models, gpus, arrivals, max_requests=1)
    recs = sorted(res.request_records, key=lambda r: r.id)
    assert [r.t_arrive for r in recs] == arrivals
    # the first starts at once; the second and third each start the instant the one before ends (FIFO);
    # the fourth arrives to an idle gateway and starts at once
    assert recs[0].t_start == 0.0
    assert recs[1].t_start == recs[0].t_end and recs[2].t_start == recs[1].t_end
    assert recs[3].t_start == 100.0
    assert _in_flight_peak(recs) == 1
    # no call of a request runs before it started; latency counts the hold
    by_req = {r.id: r for r in recs}
    assert all(c.t_submit >= by_req[c.request].t_start for c in res.call_records)
    waits = [r.t_start - r.t_arrive for r in recs]
    assert res.held_requests == 2
    assert res.held_mean_s == pytest.approx(sum(waits) / 4)
    assert res.latency_mean_s == pytest.approx(sum(r.t_end - r.t_arrive for r in recs) / 4)
    # each request alone on the engine: the first takes what it takes with nobody else, the later ones less
    # (the system prompt the first left in the cache is not prefilled again)
    alone = _chat(models, gpus, [0.0]).request_records[0]
    assert recs[0].t_end - recs[0].t_start == alone.t_end - alone.t_start
    assert all(r.t_end - r.t_start < alone.t_end - alone.t_start for r in recs[1:])


def test_requests_in_flight_never_exceed_the_cap(models, gpus):
    res = _chat(models, gpus, [0.002 * i for i in range(300)], max_requests=7)
    assert res.completed == 300
    assert _in_flight_peak(res.request_records) == 7
    assert res.held_requests > 200


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_a_cap_that_is_not_a_positive_whole_number_is_refused(models, gpus, bad):
    with pytest.raises(ValueError, match="max_requests=.*a whole number of requests of at least 1"):
        _chat(models, gpus, [0.0], max_requests=bad)


def test_the_cap_keeps_a_cache_reusing_deployment_off_its_collapse(models, gpus):
    """plan_execute's planner (70B, 1 × tp4) continues each request's conversation. Offered 2.0 rps, a little
    past what the allocation carries, the conversations in flight multiply until their histories no longer
    fit the KV cache and the planner prefills them again: hits fall and so does the rate served. A cap at
    about the plan's rate × latency (~200 requests) keeps the hits and the rate."""
    wf = load_workflow(config_dir() / "workflows" / "plan_execute.yaml", models)
    alloc = {"planner": LLMAlloc(tp=4), "executor": LLMAlloc(tp=4)}
    free = simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=2.0, n_requests=900, seed=0)
    capped = simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=2.0, n_requests=900, seed=0, max_requests=200)
    assert capped.throughput_rps > 1.25 * free.throughput_rps
    assert capped.throughput_rps > 0.9 * 2.0
    assert capped.per_llm["planner"].prefix_hit_rate > free.per_llm["planner"].prefix_hit_rate + 0.1
    assert capped.latency_mean_s < 0.7 * free.latency_mean_s
