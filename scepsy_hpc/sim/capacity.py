"""Maximum sustainable throughput of a plan, measured in the simulator.

A rate is sustainable when the simulated requests complete at the arrival rate (departure rate ≥
`keep_up` × λ) and latency stays bounded: fitted against arrival time, latency rises across the
run by at most `drift` of its mean — a queue that grows shows up as a rising trend. Runs must be
long (thousands of requests) for this to resolve a few percent near capacity. Past-capacity runs of fork-join workflows still complete
requests at a rate below λ *and* below the capacity (work in progress grows), so reading the
departure rate of one overloaded run underestimates capacity; this bisects on the rate instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from scepsy_hpc.sim.core import SimResult, simulate
from scepsy_hpc.spec.catalog import GPUSpec, ModelSpec
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import Workflow


@dataclass(frozen=True)
class CapacityResult:
    """The highest sustainable rate found, the lowest unsustainable one, and the runs made."""

    sustainable_rps: float
    unsustainable_rps: float
    runs: tuple[tuple[float, bool, float, float], ...]  # (rate, sustainable, throughput, mean latency)


def latency_trend(res: SimResult) -> float:
    """Growth of latency across the measured requests, as a fraction of their mean latency: the
    least-squares slope of latency against arrival time times the arrival span, over the mean."""
    recs = [r for r in res.request_records[int(len(res.request_records) * res.warmup_frac):] if r.t_end >= 0]
    if len(recs) < 10:
        return 0.0
    ts = [r.t_arrive for r in recs]
    ls = [r.t_end - r.t_arrive for r in recs]
    mt, ml = sum(ts) / len(ts), sum(ls) / len(ls)
    var = sum((t - mt) ** 2 for t in ts)
    if var <= 0 or ml <= 0:
        return 0.0
    slope = sum((t - mt) * (l - ml) for t, l in zip(ts, ls)) / var
    return slope * (ts[-1] - ts[0]) / ml


def saturation_throughput(res: SimResult, start_frac: float = 0.3) -> float:
    """Requests/s worth of LLM work the plan completes while overloaded: calls that finish between
    the arrival of request ⌊start_frac·n⌋ and the last arrival (the engines saturated, arrivals
    still coming), over that window, divided by the run's calls per request. Needs a run made with
    `record_calls=True` at a rate well above capacity. Unlike the departure rate of requests, which
    falls below capacity in fork-join workflows as partly done requests pile up, this counts work
    done; unlike the bisection, it does not depend on how long a metastable workflow takes to slide
    into a slower regime (both regimes are saturated here)."""
    if not res.call_records:
        raise ValueError("saturation_throughput needs a run simulated with record_calls=True")
    recs = res.request_records
    t0, t1 = recs[int(len(recs) * start_frac)].t_arrive, recs[-1].t_arrive
    if t1 <= t0 or res.calls_per_request <= 0:
        return 0.0
    done = sum(1 for c in res.call_records if t0 <= c.t_end < t1)
    return done / (t1 - t0) / res.calls_per_request


def is_sustainable(res: SimResult, keep_up: float = 0.93, drift: float = 0.25) -> bool:
    """Every request completed, departures keep up with arrivals, and latency does not trend upward
    across the run by more than `drift` of its mean (a growing queue shows up as a rising trend)."""
    if res.completed < res.requests:
        return False
    return res.throughput_rps >= keep_up * res.rate_rps and latency_trend(res) <= drift


def max_sustainable_rate(
    wf: Workflow,
    allocation: Mapping[str, LLMAlloc],
    gpu: GPUSpec,
    models: Mapping[str, ModelSpec],
    guess_rps: float,
    *,
    n_requests: int = 1500,
    seed: int = 0,
    rel_tol: float = 0.015,
    max_runs: int = 14,
    step: float = 1.08,
    on_run: Callable[[float, bool, SimResult], Any] | None = None,
) -> CapacityResult:
    """Bisect the arrival rate between a sustainable and an unsustainable one, starting near `guess_rps`."""
    runs: list[tuple[float, bool, float, float]] = []

    def ok(rate: float) -> bool:
        res = simulate(wf, allocation, gpu, models, rate_rps=rate, n_requests=n_requests, seed=seed)
        good = is_sustainable(res)
        runs.append((rate, good, res.throughput_rps, res.latency_mean_s))
        if on_run is not None:
            on_run(rate, good, res)
        return good

    lo, hi = bisect_rate(ok, guess_rps, rel_tol=rel_tol, max_runs=max_runs, step=step)
    return CapacityResult(lo, hi, tuple(runs))


def bisect_rate(ok: Callable[[float], bool], guess: float, *, rel_tol: float, max_runs: int,
                step: float) -> tuple[float, float]:
    """(highest rate `ok` accepted, lowest it refused; 0 / inf when none): step by ×`step` from
    `guess` until a sustainable and an unsustainable rate bracket the limit, then bisect to
    `rel_tol`, calling `ok` at most `max_runs` times."""
    lo, hi, n = 0.0, math.inf, 0
    rate = guess
    while n < max_runs and (math.isinf(hi) or lo == 0.0):
        n += 1
        if ok(rate):
            lo = rate
            rate *= step
        else:
            hi = rate
            rate /= step
    while n < max_runs and hi - lo > rel_tol * hi:
        n += 1
        mid = 0.5 * (lo + hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi
