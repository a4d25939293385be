"""Profile tables, the saturation sweep and synthetic profiles."""

from __future__ import annotations

import json
import math

import pytest

from scepsy_hpc.errors import EngineError, SpecError
from scepsy_hpc.perf.model import EngineConfig
from scepsy_hpc.profile.sweep import sweep
from scepsy_hpc.profile.synthetic import synthetic_profile
from scepsy_hpc.profile.table import (CallSample, ProfilePoint, ProfileTable, load_profile, save_profile,
                                      summarise)


def mm1_point(rate: float, mu: float = 10.0, service: float = 1.0) -> ProfilePoint:
    """An M/M/1-like engine: latency service/(1-ρ); throughput min(rate, μ)."""
    rho = rate / mu
    lat = service / (1 - rho) if rho < 1 else 1e6
    thr = min(rate, mu)
    return ProfilePoint(rate, thr, 500, lat, lat, lat, lat, 0.1, 0.1, 0.0, lat / 100, 0, False)


def test_summarise_fits_the_per_call_model():
    # ttft = 0.05 + 0.001·prompt, decode 0.02 s/token: the fit recovers both and averages exactly.
    samples = [CallSample(p, o, 0.05 + 0.001 * p + 0.02 * (o - 1), 0.05 + 0.001 * p)
               for p, o in [(100, 10), (400, 50), (1000, 5), (50, 200)]]
    pt = summarise(2.0, samples, span_s=2.0)
    assert pt.ttft_a_s == pytest.approx(0.05) and pt.ttft_b_s == pytest.approx(0.001)
    assert pt.tpot_s == pytest.approx(0.02)
    mean = sum(s.latency_s for s in samples) / 4
    assert sum(pt.call_latency(s.prompt_tokens, s.output_tokens) for s in samples) / 4 == pytest.approx(mean)
    assert pt.throughput_rps == pytest.approx(2.0)


def test_sweep_finds_mm1_capacity_and_is_dense_near_it():
    seen = []
    res = sweep(lambda r: (seen.append(r), mm1_point(r))[1], start_rps=0.5)
    assert res.capacity_rps == pytest.approx(10.0)
    ok = [p for p in res.points if not p.saturated]
    assert max(p.rate_rps for p in ok) >= 0.8 * 10  # the grid reaches close to capacity (M/M/1 blows up past ~0.87)
    assert all(p.rate_rps < 10 for p in ok)
    assert seen == sorted(seen[: seen.index(max(seen)) + 1]) + seen[seen.index(max(seen)) + 1:]


def test_sweep_detects_latency_blowup_without_throughput_loss():
    # throughput keeps up but latency explodes past rate 4: blow-up counts as saturation
    def measure(r):
        lat = 1.0 if r < 4 else 50.0
        return ProfilePoint(r, r, 100, lat, lat, lat, lat, 0.1, 0.1, 0.0, 0.01)
    res = sweep(measure, start_rps=1.0)
    assert any(p.saturated and p.rate_rps >= 4 for p in res.points)
    assert all(p.latency_mean_s == 1.0 for p in res.points if not p.saturated)


def test_sweep_fails_clearly_on_a_dead_endpoint():
    with pytest.raises(EngineError) as e:
        sweep(lambda r: ProfilePoint(r, 0, 0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, 0, math.nan), 1.0)
    assert "does not answer" in str(e.value)


def table(points, cap=10.0):
    return ProfileTable("m", "model", "h100-sxm", 1, 1.0, cap, tuple(points))


def test_interpolation_and_capacity():
    t = table([mm1_point(r) for r in (1, 5, 9)])
    assert t.latency_at(3) == pytest.approx((mm1_point(1).latency_mean_s + mm1_point(5).latency_mean_s) / 2)
    assert t.latency_at(0.1) == pytest.approx(mm1_point(1).latency_mean_s)
    assert math.isinf(t.latency_at(10)) and math.isinf(t.latency_at(12))
    beyond = t.latency_at(9.5)  # extrapolated like a single-server queue, between 9's value and ∞
    assert mm1_point(9).latency_mean_s < beyond < 1e6


def test_save_load_round_trip_and_bad_file(tmp_path):
    t = table([mm1_point(r) for r in (1, 5)])
    p = save_profile(t, tmp_path)
    assert load_profile(p) == t
    bad = tmp_path / "bad.json"
    d = json.loads(p.read_text())
    d["points"][0]["latency"] = 1
    bad.write_text(json.dumps(d))
    with pytest.raises(SpecError) as e:
        load_profile(bad)
    assert "points[0] has unknown field(s) latency" in str(e.value)


def test_synthetic_profile_from_the_performance_model(models, gpus):
    cfg = EngineConfig(models["llama-3.1-8b-instruct"], gpus["h100-sxm"], tp=1, gpu_frac=1.0)
    mix = [(1000, 200), (2000, 100), (500, 400)]
    t = synthetic_profile("m", "llama-3.1-8b-instruct", "h100-sxm", cfg, mix, n_calls=600)
    ok = [p for p in t.points if not p.saturated]
    assert len(ok) >= 6 and t.capacity_rps > 0
    lat = [p.latency_mean_s for p in ok]
    assert lat[-1] > 1.5 * lat[0]  # latency rises with load
    from scepsy_hpc.perf.model import EnginePerf
    one = EnginePerf(cfg).iteration_time(1, 1500)  # a lone decode: the per-token time at no load
    assert one <= t.unloaded.tpot_s < 2.0 * one
    half = EngineConfig(models["llama-3.1-8b-instruct"], gpus["h100-sxm"], tp=1, gpu_frac=0.5)
    t2 = synthetic_profile("m", "llama-3.1-8b-instruct", "h100-sxm", half, mix, n_calls=600)
    assert t2.capacity_rps < 0.7 * t.capacity_rps  # half a GPU serves well under the whole one
    assert t.source == "synthetic" and t.workload["calls"] == 3


def test_request_shaped_arrivals_keep_rate_bursts_and_offsets():
    import random

    from scepsy_hpc.profile.synthetic import _arrivals

    patterns = [[(0.0, 100, 10), (0.0, 100, 10), (0.0, 100, 10), (5.0, 50, 5)]]  # a 3-wide burst, then one call 5 s later
    times, calls = _arrivals(20.0, 4000, random.Random(0), [(1, 1)], patterns)
    assert len(times) == len(calls) and times == sorted(times)
    assert len(times) / times[-1] == pytest.approx(20.0, rel=0.1)  # the call rate asked for
    from collections import Counter
    same = Counter(times)
    assert max(same.values()) >= 3  # bursts arrive at one instant
    assert sum(1 for c in calls if c.prompt_tokens == 50) == pytest.approx(len(calls) / 4, rel=0.1)


def test_pooled_request_shaped_profile_is_per_replica(models, gpus):
    cfg = EngineConfig(models["llama-3.2-1b-instruct"], gpus["h100-sxm"], tp=1, gpu_frac=0.25)
    mix = [(800, 100), (1200, 60)]
    pats = [[(0.0, 800, 100), (0.0, 1200, 60)], [(0.0, 800, 100)]]
    one = synthetic_profile("m", "x", "h100-sxm", cfg, mix, n_calls=500)
    two = synthetic_profile("m", "x", "h100-sxm", cfg, mix, n_calls=500, replicas=2, patterns=pats)
    assert two.replicas == 2 and two.arrivals == "requests" and one.arrivals == "poisson"
    assert two.capacity_rps == pytest.approx(one.capacity_rps, rel=0.25)  # per replica, not for both


def test_sweep_keeps_capacity_inside_the_bracket_the_climb_found():
    # A live engine read over a short run can report nonsense throughput past saturation.
    def measure(r):
        if r < 6:
            return ProfilePoint(r, r, 100, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.0, 0.01)
        return ProfilePoint(r, 5 * r, 100, 50.0, 50.0, 50.0, 50.0, 0.1, 0.1, 0.0, 0.01)  # blown up, throughput bogus
    res = sweep(measure, start_rps=1.0, bracket=True)
    ok = max(p.rate_rps for p in res.points if not p.saturated)
    first_bad_in_climb = 1.6 ** 4  # 1, 1.6, 2.56, 4.1 keep up; 6.55 does not
    assert ok <= res.capacity_rps <= first_bad_in_climb + 1e-9  # not the bogus 5x throughput
    assert sweep(measure, start_rps=1.0).capacity_rps > 20  # without the bracket the reading is taken as is
