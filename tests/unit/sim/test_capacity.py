"""The simulator's maximum-sustainable-rate search on a case with a known answer."""

from __future__ import annotations

import pytest

from scepsy_hpc.sim.capacity import latency_trend, max_sustainable_rate, saturation_throughput
from scepsy_hpc.sim.core import simulate
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import workflow_from_text

WF = """
name: one
llms: {m: {model: llama-3.1-8b-instruct}}
program:
  - {call: m, prompt_tokens: 100, output_tokens: {geometric: {mean: 200}}}
"""


def test_trend_flat_when_stable_rising_when_overloaded(models, gpus):
    wf = workflow_from_text(WF, models)
    alloc = {"m": LLMAlloc(tp=1, gpu_frac=1.0, replicas=1, max_num_seqs=1)}
    # batch 1: an M/G/1 queue with service ≈ 200 tokens of decode
    low = simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=0.1, n_requests=1500, seed=0)
    high = simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=3.0, n_requests=1500, seed=0)
    assert abs(latency_trend(low)) < 0.3
    assert latency_trend(high) > 1.0


def test_max_sustainable_rate_brackets_the_service_rate(models, gpus):
    wf = workflow_from_text(WF, models)
    alloc = {"m": LLMAlloc(tp=1, gpu_frac=1.0, replicas=1, max_num_seqs=1)}
    service = simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=0.01, n_requests=300, seed=0).latency_mean_s
    mu = 1.0 / service
    found = max_sustainable_rate(wf, alloc, gpus["h100-sxm"], models, 0.7 * mu, n_requests=3000, seed=0)
    assert found.sustainable_rps < found.unsustainable_rps
    assert 0.8 * mu < found.sustainable_rps <= 1.02 * mu


def test_saturation_throughput_reads_the_service_rate_under_overload(models, gpus):
    wf = workflow_from_text(WF, models)
    alloc = {"m": LLMAlloc(tp=1, gpu_frac=1.0, replicas=1, max_num_seqs=1)}
    service = simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=0.01, n_requests=300, seed=0).latency_mean_s
    mu = 1.0 / service
    over = simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=2.0 * mu, n_requests=3000, seed=0, record_calls=True)
    assert 0.93 * mu < saturation_throughput(over) < 1.07 * mu
    # below capacity it reads the arrival rate, not the capacity
    under = simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=0.5 * mu, n_requests=3000, seed=0, record_calls=True)
    assert 0.43 * mu < saturation_throughput(under) < 0.57 * mu
    with pytest.raises(ValueError, match="record_calls"):
        saturation_throughput(simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=mu, n_requests=50, seed=0))
