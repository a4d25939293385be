"""Simulator invariants, queueing theory, determinism and the documented tie-break order."""

from __future__ import annotations

import math
import random

import pytest

from scepsy_hpc.perf.model import EnginePerf
from scepsy_hpc.sim import simulate
from scepsy_hpc.perf.fit import engine_config
from scepsy_hpc.workload.sampler import Call, sample_request, unloaded_latency
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import load_workflow, workflow_from_text
from scepsy_hpc.spec.catalog import config_dir

H100 = "h100-sxm"


def _wf(name, models):
    return load_workflow(config_dir() / "workflows" / f"{name}.yaml", models)


DEEP = {"planner": LLMAlloc(tp=4), "searcher": LLMAlloc(replicas=4), "writer": LLMAlloc(tp=2, replicas=2)}


def _one_llm(models, output="{geometric: {mean: 300}}", prompt="1", model="llama-3.1-8b-instruct"):
    return workflow_from_text(f"""name: one
llms: {{m: {{model: {model}}}}}
program:
  - {{call: m, prompt_tokens: {prompt}, output_tokens: {output}}}
""", models)


def test_every_request_completes_exactly_once_and_calls_are_ordered(models, gpus):
    wf = _wf("deep_research", models)
    res = simulate(wf, DEEP, gpus[H100], models, rate_rps=1.0, n_requests=150, seed=3, record_calls=True)
    assert res.completed == res.requests == 150
    assert sorted(r.id for r in res.request_records) == list(range(150))
    assert all(r.finishes == 1 and r.t_end >= r.t_arrive for r in res.request_records)
    assert len(res.call_records) == res.llm_calls == sum(r.llm_calls for r in res.request_records)
    for c in res.call_records:
        assert c.t_submit <= c.t_admit <= c.t_first <= c.t_end
        req = res.request_records[c.request]
        assert req.t_arrive <= c.t_submit and c.t_end <= req.t_end


def test_same_seed_same_result_other_seed_other_result(models, gpus):
    wf = _wf("deep_research", models)
    run = lambda seed: simulate(wf, DEEP, gpus[H100], models, rate_rps=0.8, n_requests=120, seed=seed).to_dict()
    a, b, c = run(5), run(5), run(6)
    for d in (a, b, c):
        d.pop("wall_s"), d.pop("llm_calls_per_wall_s")
    assert a == b
    assert a != c


def test_the_workload_does_not_depend_on_the_plan(models, gpus):
    wf = _wf("deep_research", models)
    other = {"planner": LLMAlloc(tp=2, replicas=2), "searcher": LLMAlloc(gpu_frac=0.5, replicas=6), "writer": LLMAlloc(tp=4)}
    r1 = simulate(wf, DEEP, gpus[H100], models, rate_rps=0.5, n_requests=60, seed=9)
    r2 = simulate(wf, other, gpus[H100], models, rate_rps=0.5, n_requests=60, seed=9)
    assert [r.llm_calls for r in r1.request_records] == [r.llm_calls for r in r2.request_records]
    assert [r.t_arrive for r in r1.request_records] == [r.t_arrive for r in r2.request_records]
    assert r1.latency_mean_s != r2.latency_mean_s


def _erlang_c_wait(c: int, lam: float, service_s: float) -> float:
    a = lam * service_s
    head = sum(a**k / math.factorial(k) for k in range(c))
    tail = a**c / math.factorial(c) * c / (c - a)
    return tail / (head + tail) / (c / service_s - lam)


@pytest.mark.parametrize("c,rho", [(1, 0.7), (3, 0.7)])
def test_degenerate_case_matches_mmc(models, gpus, c, rho):
    """One LLM, one call per request, batch capped at 1, exponential service -> M/M/c."""
    wf = _one_llm(models)
    alloc = {"m": LLMAlloc(replicas=c, max_num_seqs=1, max_batched_tokens=2048)}
    perf = EnginePerf(engine_config(alloc["m"], models["llama-3.1-8b-instruct"], gpus[H100]))
    service = perf.request_latency(1, 300)  # geometric(300) tokens at a near-constant step: CV^2 = 0.997
    lam = rho * c / service
    expected = service + _erlang_c_wait(c, lam, service)
    sims = [simulate(wf, alloc, gpus[H100], models, rate_rps=lam, n_requests=25_000, seed=s, warmup_frac=0.05) for s in range(4)]
    got = sum(r.latency_mean_s for r in sims) / len(sims)
    assert abs(got - expected) / expected < 0.05, (got, expected)
    assert all(r.completed == 25_000 for r in sims)


def test_tie_break_is_used_an_arrival_at_a_boundary_joins_that_boundary(models, gpus):
    """A call arriving exactly when an iteration ends is admitted at that boundary, not one later.

    The first request's 5000-token prompt is prefilled in 2048-token chunks, so at the end of its
    first chunk the engine starts another iteration at once: only the documented order (arrivals
    before engine events at equal times) lets the second request join that iteration.
    """
    wf = _one_llm(models, output="50", prompt="{choice: {values: [5000, 100], weights: [1, 0]}}")
    alloc = {"m": LLMAlloc(max_batched_tokens=2048)}
    perf = EnginePerf(engine_config(alloc["m"], models["llama-3.1-8b-instruct"], gpus[H100]))
    boundary = perf.iteration_time(0, 0, [(2048, 0)])  # end of the first prefill chunk
    res = simulate(wf, alloc, gpus[H100], models, arrivals=[0.0, boundary], warmup_frac=0.0, record_calls=True)
    second = [c for c in res.call_records if c.request == 1][0]
    assert second.t_submit == boundary
    assert second.t_admit == boundary


def test_parallel_and_fanout_run_concurrently_on_the_critical_path(models, gpus):
    wf = _wf("mixture_of_agents", models)
    alloc = {k: LLMAlloc(tp=4) for k in ("qwen72", "llama70")} | {"mixtral": LLMAlloc(tp=4), "qwen32": LLMAlloc(tp=2)}
    res = simulate(wf, alloc, gpus[H100], models, arrivals=[0.0], warmup_frac=0.0, record_calls=True)
    tree = sample_request(wf, random.Random("0/programs"))
    # unloaded critical path using each call's simulated latency (calls are matched by LLM and tokens)
    remaining = list(res.call_records)

    def lat(call: Call) -> float:
        for i, rec in enumerate(remaining):
            if rec.llm == call.llm and rec.prompt_tokens == call.prompt_tokens and rec.output_tokens == call.output_tokens:
                remaining.pop(i)
                return rec.t_end - rec.t_submit
        raise AssertionError(f"no record for {call}")

    critical = unloaded_latency(tree, lat)
    serial = sum(c.t_end - c.t_submit for c in res.call_records)
    latency = res.request_records[0].t_end - res.request_records[0].t_arrive
    assert math.isclose(latency, critical, rel_tol=1e-9)
    assert latency < 0.6 * serial  # the proposers overlap
    assert not remaining


def test_kv_capacity_and_max_num_seqs_are_never_exceeded(models, gpus):
    wf = _one_llm(models, output="{lognormal: {mean: 400, cv: 0.8}}", prompt="{normal: {mean: 3000, sd: 500}}")
    alloc = {"m": LLMAlloc(gpu_frac=0.25, max_num_seqs=12)}
    res = simulate(wf, alloc, gpus[H100], models, rate_rps=4.0, n_requests=400, seed=1, record_calls=True)
    cap = res.per_llm["m"].kv_capacity_tokens
    events = sorted([(c.t_admit, 1, c) for c in res.call_records] + [(c.t_end, 0, c) for c in res.call_records],
                    key=lambda e: (e[0], e[1]))
    used = running = peak_used = peak_running = 0
    for _, kind, c in events:
        sign = 1 if kind else -1
        used += sign * (c.prompt_tokens + c.output_tokens)
        running += sign
        peak_used, peak_running = max(peak_used, used), max(peak_running, running)
    assert peak_used <= cap
    assert peak_running <= 12
    assert res.per_llm["m"].queue_mean_s > 0.1  # the limits made calls wait
    assert res.completed == 400


def test_calls_larger_than_the_kv_cache_are_truncated_and_counted(models, gpus):
    # within the model's context (131,072 tokens: a longer prompt is refused by the spec), beyond this engine's KV
    wf = _one_llm(models, output="500", prompt="100000")
    res = simulate(wf, {"m": LLMAlloc(gpu_frac=0.3)}, gpus[H100], models, rate_rps=0.1, n_requests=5, seed=0)
    assert res.completed == 5
    assert res.per_llm["m"].truncated_calls == 5


def test_horizon_leaves_requests_unfinished(models, gpus):
    wf = _wf("deep_research", models)
    res = simulate(wf, DEEP, gpus[H100], models, rate_rps=2.0, n_requests=200, seed=0, horizon_s=30.0)
    assert res.completed < res.requests


def test_throughput_tracks_the_rate_below_capacity_and_saturates_above(models, gpus):
    wf = _one_llm(models, output="200", prompt="500")
    alloc = {"m": LLMAlloc(max_num_seqs=4)}
    low = simulate(wf, alloc, gpus[H100], models, rate_rps=0.5, n_requests=2000, seed=0)
    high = simulate(wf, alloc, gpus[H100], models, rate_rps=20.0, n_requests=2000, seed=0)
    higher = simulate(wf, alloc, gpus[H100], models, rate_rps=40.0, n_requests=2000, seed=0)
    assert abs(low.throughput_rps - 0.5) / 0.5 < 0.08
    assert high.throughput_rps < 10.0  # 4 sequences of ~1.6 s each cannot serve 20 rps
    assert abs(higher.throughput_rps - high.throughput_rps) / high.throughput_rps < 0.05  # saturated


def test_tool_latency_adds_to_request_latency(models, gpus):
    text = """name: tooly
llms: {m: {model: llama-3.1-8b-instruct}}
tools: {slow: {latency_s: 7.5}}
program:
  - {call: m, prompt_tokens: 10, output_tokens: 10}
  - {tool: slow}
"""
    wf = workflow_from_text(text, models)
    res = simulate(wf, {"m": LLMAlloc()}, gpus[H100], models, arrivals=[0.0], warmup_frac=0.0, record_calls=True)
    call = res.call_records[0]
    assert math.isclose(res.request_records[0].t_end, call.t_end + 7.5)


def test_missing_allocation_is_an_infeasible_error(models, gpus):
    from scepsy_hpc.errors import InfeasibleError

    wf = _wf("deep_research", models)
    with pytest.raises(InfeasibleError) as ei:
        simulate(wf, {"planner": LLMAlloc(tp=4)}, gpus[H100], models, rate_rps=1.0, n_requests=5)
    assert "searcher" in str(ei.value) and "writer" in str(ei.value)
