"""The simulator's capacity judge and maximum-sustainable-rate search, on cases with known answers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from scepsy_hpc.sim.capacity import (backlog_growth, bisect_rate, is_sustainable, judge, max_sustainable_rate, still_filling,
                                     too_short)
from scepsy_hpc.sim.core import RequestRecord, simulate
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import workflow_from_text

WF = """
name: one
llms: {m: {model: llama-3.1-8b-instruct}}
program:
  - {call: m, prompt_tokens: 100, output_tokens: {geometric: {mean: 200}}}
"""


def _queue(models, gpus):
    """A batch-1 engine: an M/G/1 queue whose service rate μ is one over the unloaded latency."""
    wf = workflow_from_text(WF, models)
    alloc = {"m": LLMAlloc(tp=1, gpu_frac=1.0, replicas=1, max_num_seqs=1)}
    service = simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=0.01, n_requests=300, seed=0).latency_mean_s
    return wf, alloc, 1.0 / service


def test_backlog_growth_reads_zero_below_capacity_and_the_shortfall_above(models, gpus):
    wf, alloc, mu = _queue(models, gpus)
    low = simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=0.5 * mu, n_requests=3000, seed=0)
    high = simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=2.0 * mu, n_requests=3000, seed=0)
    assert abs(backlog_growth(low)) < 0.02 and is_sustainable(low)
    # past capacity, 1 − μ/λ of the arrivals pile up
    assert backlog_growth(high) == pytest.approx(0.5, abs=0.07)
    assert not is_sustainable(high) and not still_filling(high)


def test_max_sustainable_rate_brackets_the_service_rate(models, gpus):
    wf, alloc, mu = _queue(models, gpus)
    found = max_sustainable_rate(wf, alloc, gpus["h100-sxm"], models, 0.7 * mu, n_requests=3000, seed=0)
    assert found.sustainable_rps < found.unsustainable_rps
    # a pile-up of up to 2% passes (λ ≤ μ / 0.98), and near ρ = 1 the queue is a slow random walk
    assert 0.8 * mu < found.sustainable_rps <= 1.05 * mu
    assert len(found.requests) == len(found.runs) and min(found.requests) >= 3000


def _run(latency, calls: list[int], completed_short: int = 0):
    """A stand-in for the simulator: one arrival per second, request i done after latency(i) s."""
    def run(n: int):
        calls.append(n)
        recs = tuple(RequestRecord(i, float(i), float(i) + latency(float(i)), 1, 1) for i in range(n))
        return SimpleNamespace(request_records=recs, requests=n, completed=n - completed_short)
    return run


def test_a_run_still_filling_is_lengthened_until_it_settles():
    calls: list[int] = []
    good, res = judge(_run(lambda t: 200.0 * (1.0 - math.exp(-t / 300.0)), calls), 600)
    assert good and calls == [600, 1200, 2400] and res.requests == 2400
    # with no room to lengthen, the same run is refused
    calls.clear()
    assert judge(_run(lambda t: 200.0 * (1.0 - math.exp(-t / 300.0)), calls), 600, max_extend=2,
                 fill_extend=2)[0] is False
    assert calls == [600, 1200]
    # at max_extend 2 it still goes past the cap, the run being shorter than twice its fill
    calls.clear()
    assert judge(_run(lambda t: 200.0 * (1.0 - math.exp(-t / 300.0)), calls), 600, max_extend=2)[0] is True
    assert calls == [600, 1200, 2400]


def test_steady_pile_up_is_refused_once_confirmed_and_a_late_surge_is_not():
    calls: list[int] = []
    good, _ = judge(_run(lambda t: 0.1 * t, calls), 600)   # latency grows linearly: c/(1+c) ≈ 9% pile up
    assert not good and calls == [600, 1200]                # below CONFIRM: refused on two lengths
    calls.clear()
    assert judge(_run(lambda t: 0.5 * t, calls), 600)[0] is False and calls == [600]   # ~33%: at once
    # a surge over the last fifth of the first 600 arrivals (latency up 0.5 s per arrival, then back):
    # the short run reads as overload, twice its length holds
    surge = lambda t: 5.0 + (0.5 * (t - 480.0) if 480.0 <= t < 600.0 else 0.0)  # noqa: E731
    calls.clear()
    first = _run(surge, [])(600)
    assert not is_sustainable(first)
    assert judge(_run(surge, calls), 600)[0] is True and calls == [600, 1200]
    calls.clear()
    assert judge(_run(lambda t: 5.0, calls), 600)[0] is True and calls == [600]
    calls.clear()
    assert judge(_run(lambda t: 5.0, calls, completed_short=1), 600)[0] is False and calls == [600]


def test_a_run_shorter_than_its_latency_allows_is_lengthened_even_if_it_grows_steadily():
    # latency climbs linearly for 500 s, then holds at 300 s: a slow fill, not overload; the first
    # 600 requests alone look like overload (steady growth), but span only 10 early latencies
    fill = lambda t: min(0.6 * t, 300.0)  # noqa: E731
    calls: list[int] = []
    good, res = judge(_run(fill, calls), 600)
    assert good and calls == [600, 1200, 2400]
    first = _run(fill, [])(600)
    assert too_short(first) and not still_filling(first) and not is_sustainable(first)
    # a long run of the same steady overload is not too short, and is refused once twice its length grows too
    calls.clear()
    assert judge(_run(lambda t: 0.05 * t, calls), 600)[0] is False and calls == [600, 1200]
    assert not too_short(_run(lambda t: 0.05 * t, [])(600))


def test_growth_verdict_reads_the_interval_against_the_tolerance():
    from scepsy_hpc.sim.capacity import Growth

    assert Growth(0.010, 0.004, 100).verdict() == "holds"        # 0.010 + 2.31·0.004 ≤ 0.02
    assert Growth(0.010, 0.005, 100).verdict() == "undecided"    # the interval reaches past 2%
    assert Growth(0.050, 0.010, 100).verdict() == "grows"        # all of it above 2%
    assert Growth(0.030, 0.005, 100).verdict() == "undecided"
    assert Growth(0.0, math.inf, 0).verdict() == "undecided"      # too few arrivals to tell


def test_growth_interval_on_a_queue_below_and_past_capacity(models, gpus):
    from scepsy_hpc.sim.capacity import growth_interval

    wf, alloc, mu = _queue(models, gpus)
    low = growth_interval(simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=0.5 * mu, n_requests=3000, seed=0))
    high = growth_interval(simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=2.0 * mu, n_requests=3000, seed=0))
    assert low.verdict() == "holds" and abs(low.growth) < 0.01
    assert high.verdict() == "grows" and high.growth == pytest.approx(0.5, abs=0.07) and high.stderr < 0.05


def _wander(seed: int, n: int = 5000, mean_s: float = 40.0, sd_s: float = 10.0, memory: float = 0.995):
    """Latency per request that wanders (AR(1), memory of ~200 requests) around a fixed mean: a
    backlog with no trend whose short stretches can look like one."""
    import random

    rng, x, out = random.Random(seed), 0.0, []
    for _ in range(n):
        x = memory * x + rng.gauss(0.0, sd_s * math.sqrt(1 - memory * memory))
        out.append(max(1.0, mean_s + x))
    return lambda t: out[int(t)]


def test_a_backlog_that_wanders_but_does_not_grow_is_lengthened_not_refused():
    from scepsy_hpc.sim.capacity import growth_interval

    first = _run(_wander(0), [])(600)
    # the fixed test read this as overload at once: a slope past 2%, growing steadily, long enough
    assert backlog_growth(first) > 0.02 and not still_filling(first) and not too_short(first)
    # its batch-means interval reaches both sides of 2%: undecided, so the run is lengthened
    assert growth_interval(first).verdict() == "undecided"
    calls: list[int] = []
    assert judge(_run(_wander(0), calls), 600)[0] is True and calls == [600, 1200]


def test_a_run_far_too_short_for_its_latency_jumps_to_the_length_it_needs():
    # early latencies of ~200 s at 1 arrival/s: 12 of them need ~2,400 requests; 1,200 is skipped
    calls: list[int] = []
    good, _ = judge(_run(lambda t: min(2.0 * t, 400.0), calls), 600, max_extend=8)
    assert good and calls == [600, 2400]
    calls.clear()   # never past max_extend × the requests asked for
    assert judge(_run(lambda t: min(2.0 * t, 4000.0), calls), 600, max_extend=4)[0] is False
    assert calls == [600, 2400]


def test_a_fill_longer_than_max_extend_allows_goes_on_to_twice_its_latencies():
    # latency starts at 300 s (at 1 arrival/s: 300 in flight) and creeps up 5% of the arrivals until
    # t = 2,000 s, then holds: at 4 × 600 the backlog still grows, but less than overload's 10%, and
    # the run spans under 12 early latencies — so it goes on (to 4,800 ≤ 2 × ~3,800) and holds
    fill = lambda t: 300.0 + 0.05 * min(t, 2000.0)  # noqa: E731
    calls: list[int] = []
    good, res = judge(_run(fill, calls), 600, max_extend=4)
    assert good and calls == [600, 2400, 4800] and res.requests == 4800
    calls.clear()   # with fill_extend at max_extend, the old ceiling: refused at 4 × 600
    assert judge(_run(fill, calls), 600, max_extend=4, fill_extend=4)[0] is False and calls == [600, 2400]


def test_steady_overload_is_not_lengthened_past_max_extend_however_long_its_latency():
    # latency 300 s climbing 20% of the arrivals: too short for its latency at every length, but a
    # steady pile-up of ~17%, past OVERLOAD: refused at max_extend × the requests, never past it
    calls: list[int] = []
    assert judge(_run(lambda t: 300.0 + 0.2 * t, calls), 600, max_extend=4)[0] is False
    assert calls == [600, 2400]


@pytest.mark.parametrize("limit", [0.05, 0.9, 1.0, 3.0, 20.0])
def test_bisection_brackets_a_limit_far_from_its_guess_in_few_runs(limit):
    """A plan over-rated 20-fold (or under-rated as much) is bracketed and bisected to the tolerance
    within the bench's 14 runs: the bracketing steps grow (×1.08, ×1.08, ×1.17, ×1.36, ×1.85, ×2 …)."""
    tried = []

    def ok(rate):
        tried.append(rate)
        return rate <= limit

    lo, hi = bisect_rate(ok, 1.0, rel_tol=0.015, max_runs=14, step=1.08)
    near = 0.2 < limit < 5   # to the tolerance; 20-fold off, within 3% (the old fixed step never bracketed it)
    assert lo <= limit < hi and hi - lo <= (0.015 if near else 0.03) * hi, (lo, hi, tried)
    assert len(tried) <= 14
    if limit == 1.0:   # a limit at the guess is bracketed by the small step, as before
        assert tried[:3] == [1.0, 1.08, 1.04]


def test_an_interrupted_bisection_replays_its_judged_rates_and_simulates_only_the_rest(models, gpus, tmp_path):
    """What `scepsy bench --resume` relies on: the rates a stopped bisection had judged (its journal,
    last line torn mid-write) are taken as they were, and the search ends exactly where an
    uninterrupted one does, simulating only the rates not yet judged."""
    from scepsy_hpc.commands.bench_resume import read_runs, run_writer

    wf, alloc, mu = _queue(models, gpus)
    gpu = gpus["h100-sxm"]
    path = tmp_path / "cap.jsonl"
    whole = max_sustainable_rate(wf, alloc, gpu, models, 0.7 * mu, n_requests=800, seed=3, on_run=run_writer(path))
    lines = [x for x in path.read_text().splitlines() if x]
    assert len(lines) == len(whole.runs) >= 4
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])   # stopped while writing the 4th
    known = read_runs(path)
    assert sorted(known) == sorted(r[0] for r in whole.runs[:3])
    simulated: list[float] = []
    again = max_sustainable_rate(wf, alloc, gpu, models, 0.7 * mu, n_requests=800, seed=3, known=known,
                                 on_run=lambda rate, ok, res: simulated.append(rate))
    assert (again.sustainable_rps, again.unsustainable_rps) == (whole.sustainable_rps, whole.unsustainable_rps)
    assert again.runs == whole.runs and again.requests == whole.requests
    assert simulated == [r[0] for r in whole.runs[3:]]
