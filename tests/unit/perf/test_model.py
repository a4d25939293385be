"""The roofline iteration model and the closed-form decode series."""

from __future__ import annotations

import math
import random

import pytest

from scepsy_hpc.perf.model import DecodeSeries, EngineConfig, EnginePerf
from scepsy_hpc.spec.catalog import GIB


def _brute(series: DecodeSeries, n: int) -> list[float]:
    sums, acc = [0.0], 0.0
    for i in range(n):
        acc += series.term(i)
        sums.append(acc)
    return sums


def test_decode_series_matches_brute_force_sums_and_inverse():
    rng = random.Random(7)
    checked = 0
    while checked < 500:
        s = DecodeSeries(rng.uniform(0, 1), rng.uniform(-0.005, 0.02), rng.uniform(0, 1), rng.uniform(-0.005, 0.02), rng.uniform(0, 0.1))
        if any(s.term(i) <= 0 for i in range(300)):
            continue
        sums = _brute(s, 300)
        for k in (0, 1, 2, 17, 150, 300):
            assert math.isclose(s.total(k), sums[k], rel_tol=1e-9, abs_tol=1e-12)
        for _ in range(5):
            dt = rng.uniform(0, sums[-1])
            assert s.count_within(dt) == max(j for j in range(301) if sums[j] <= dt)
        assert s.count_within(sums[40]) == 40  # an exact boundary counts as finished
        checked += 1


def test_series_agrees_with_iteration_time(models, gpus):
    perf = EnginePerf(EngineConfig(models["llama-3.1-8b-instruct"], gpus["h100-sxm"]))
    n, ctx0 = 48, 48 * 700
    series = perf.decode_series(n, ctx0)
    for i in (0, 10, 500):
        assert math.isclose(series.term(i), perf.iteration_time(n, ctx0 + n * i), rel_tol=1e-12)


def test_batching_is_nearly_free_when_memory_bound_and_not_when_compute_bound(models, gpus):
    perf = EnginePerf(EngineConfig(models["llama-3.1-8b-instruct"], gpus["h100-sxm"]))
    t1, t16 = perf.iteration_time(1, 500), perf.iteration_time(16, 16 * 500)
    assert t16 < 1.15 * t1  # decode of 16 costs little more than 1 (weights dominate)
    big = perf.iteration_time(0, 0, [(8192, 0)])
    assert big > 20 * t1  # an 8k-token prefill is compute bound


def test_tensor_parallel_cuts_per_token_time_of_a_70b(models, gpus):
    m, g = models["llama-3.1-70b-instruct"], gpus["h100-sxm"]
    tp2 = EnginePerf(EngineConfig(m, g, tp=2)).iteration_time(8, 8000)
    tp4 = EnginePerf(EngineConfig(m, g, tp=4)).iteration_time(8, 8000)
    assert 1.3 < tp2 / tp4 < 2.0  # faster, but all-reduce keeps it short of 2x


def test_gpu_fraction_scales_speed_and_memory(models, gpus):
    m, g = models["llama-3.1-8b-instruct"], gpus["h100-sxm"]
    full, half = EnginePerf(EngineConfig(m, g)), EnginePerf(EngineConfig(m, g, gpu_frac=0.5))
    ovh = g.iter_overhead_ms / 1e3
    assert math.isclose(half.iteration_time(4, 4000) - ovh, 2 * (full.iteration_time(4, 4000) - ovh), rel_tol=1e-9)
    assert half.kv_capacity_tokens < full.kv_capacity_tokens / 2


def test_kv_capacity_by_hand(models, gpus):
    m, g = models["llama-3.1-8b-instruct"], gpus["h100-sxm"]
    perf = EnginePerf(EngineConfig(m, g))
    usable = (g.mem_gib * 0.9 - g.reserved_gib) * GIB - m.params_b * 1e9 * 2
    assert perf.kv_capacity_tokens == int(usable // (2 * 32 * 8 * 128 * 2))


def test_moe_reads_more_experts_as_tokens_grow(models, gpus):
    perf = EnginePerf(EngineConfig(models["mixtral-8x7b-instruct"], gpus["h100-sxm"], tp=2))
    one, many = perf.weight_bytes_read(1), perf.weight_bytes_read(64)
    assert one < 0.4 * many
    assert math.isclose(many, models["mixtral-8x7b-instruct"].weight_bytes, rel_tol=1e-6)


@pytest.mark.parametrize("kw", [dict(tp=3), dict(gpu_frac=0.5, tp=2), dict(gpu_frac=0.0), dict(max_num_seqs=9000)])
def test_engine_config_rejects_bad_shapes(models, gpus, kw):
    with pytest.raises(ValueError):
        EngineConfig(models["llama-3.1-8b-instruct"], gpus["h100-sxm"], **kw)
