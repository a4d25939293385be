"""Maximum sustainable throughput of a plan, measured in the simulator.

A rate is sustainable when every simulated request completes and the requests in the system stop
piling up: after the first third of the arrivals, the least-squares slope of the number of
requests in flight (sampled at each arrival), divided by the arrival rate, is at most `PILEUP`
(2%: a plan that departs fewer than 98% of what arrives is overloaded; so rates up to μ/0.98 of a
capacity μ pass). By Little's law, bounded work in progress at a steady arrival rate is bounded
mean latency; unlike a latency trend, this reading has no end effect (it stops at the last
arrival, before the system drains).

Workflows with long, step-synchronous requests (beam search: ~9 reasoning steps, latencies of
minutes near capacity) take thousands of requests to fill: work in progress grows towards its
steady level for several request latencies, and a short run reads that fill as overload at any
rate. So a run whose backlog still grows but decelerates — over the last third it grows by less
than ¾ of its growth over the middle third — is lengthened (the same arrivals and programs, twice
as many) up to `MAX_EXTEND` × the requests asked for; a backlog that grows at a steady pace is
overload and is refused at once — unless the run spans fewer than `FILL_LATENCIES` (12) mean
latencies of its early requests, too short to tell a slow fill from overload. Past capacity,
fork-join workflows still complete requests at a rate below λ and below the capacity (partly done
requests pile up), so one overloaded run's departure rate under-reads the capacity; this bisects
on the rate instead.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from scepsy_hpc.sim.core import SimResult, simulate
from scepsy_hpc.spec.catalog import GPUSpec, ModelSpec
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import Workflow

PILEUP = 0.02        # sustainable: at most 2% of the arrivals after the first third pile up
SETTLING = 0.75      # still filling: the pile-up over the last third is below ¾ of that over the middle third
MAX_EXTEND = 4       # a filling run is doubled up to 4× the requests asked for
FILL_LATENCIES = 12  # a run shorter than 12 early request latencies has not filled: it is lengthened


@dataclass(frozen=True)
class CapacityResult:
    """The highest sustainable rate found, the lowest unsustainable one, and the runs made."""

    sustainable_rps: float
    unsustainable_rps: float
    runs: tuple[tuple[float, bool, float, float], ...]  # (rate, sustainable, throughput, mean latency)
    requests: tuple[int, ...] = ()                       # requests simulated per run (after extensions)


def backlog_growth(res: SimResult, lo: float = 1 / 3, hi: float = 1.0) -> float:
    """Requests piling up per request arriving, over arrivals ⌊lo·n⌋ … ⌈hi·n⌉−1: the least-squares
    slope of the requests in the system (sampled just after each arrival) against arrival time,
    over the arrival rate in that stretch. ≈ 0 when departures keep up, ≈ 1 − μ/λ past capacity μ."""
    return _backlog(res, lo, hi)[0]


def _backlog(res: SimResult, lo: float, hi: float) -> tuple[float, float, int]:
    """(backlog_growth, mean requests in the system, arrivals) over arrivals ⌊lo·n⌋ … ⌈hi·n⌉−1."""
    recs = res.request_records
    n = len(recs)
    a, b = int(n * lo), min(n, math.ceil(n * hi))
    if b - a < 10:
        return 0.0, 0.0, max(b - a, 0)
    ends = sorted(r.t_end for r in recs if r.t_end >= 0)
    ts = [recs[i].t_arrive for i in range(a, b)]
    ws = [i + 1 - bisect.bisect_right(ends, recs[i].t_arrive) for i in range(a, b)]
    span = ts[-1] - ts[0]
    mt, mw = sum(ts) / len(ts), sum(ws) / len(ws)
    if span <= 0:
        return 0.0, mw, len(ts)
    var = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (w - mw) for t, w in zip(ts, ws)) / var
    return slope * span / (len(ts) - 1), mw, len(ts)


def is_sustainable(res: SimResult, pileup: float = PILEUP) -> bool:
    """Every request completed and, after the first third of the arrivals, at most `pileup` of them
    piled up (see `backlog_growth`) — or no more than two standard deviations of a Poisson count
    of the mean requests in flight (2·√W: a short run of a light workflow sees its backlog jitter
    by a few requests, which is not a trend)."""
    if res.completed < res.requests:
        return False
    growth, wip, arrivals = _backlog(res, 1 / 3, 1.0)
    return growth * arrivals <= max(pileup * arrivals, 2.0 * math.sqrt(wip))


def still_filling(res: SimResult, pileup: float = PILEUP, settling: float = SETTLING) -> bool:
    """The backlog grows after the first third but decelerates: over the last third it grows by
    less than `settling` × its growth over the middle third — a run too short for the workflow to
    reach its steady state, not overload (whose backlog grows at a steady pace)."""
    return (not is_sustainable(res, pileup)
            and backlog_growth(res, 2 / 3) < settling * backlog_growth(res, 1 / 3, 2 / 3))


def too_short(res: SimResult, fill_latencies: float = FILL_LATENCIES) -> bool:
    """The run's arrivals span less than `fill_latencies` × the mean latency of its first third of
    requests: too short for a workflow whose requests take that long to reach its steady backlog
    (beam search at 32 GPUs fills over ~2,000 requests and, until then, grows as steadily as
    overload does)."""
    recs = res.request_records
    early = [r.t_end - r.t_arrive for r in recs[: len(recs) // 3] if r.t_end >= 0]
    if len(recs) < 2 or not early:
        return False
    return recs[-1].t_arrive - recs[0].t_arrive < fill_latencies * sum(early) / len(early)


def judge(run: Callable[[int], SimResult], n_requests: int, max_extend: int = MAX_EXTEND,
          pileup: float = PILEUP) -> tuple[bool, SimResult]:
    """Run `run(n)` from `n_requests`, doubling n while the run is still filling or too short for
    its request latency (up to `max_extend` × `n_requests`); the verdict of `is_sustainable` on
    the last run, and that run."""
    n = n_requests
    while True:
        res = run(n)
        if is_sustainable(res, pileup):
            return True, res
        if res.completed < res.requests or 2 * n > max_extend * n_requests:
            return False, res
        if not (still_filling(res, pileup) or too_short(res)):
            return False, res
        n *= 2


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
    max_extend: int = MAX_EXTEND,
    on_run: Callable[[float, bool, SimResult], Any] | None = None,
) -> CapacityResult:
    """Bisect the arrival rate between a sustainable and an unsustainable one, starting near `guess_rps`."""
    runs: list[tuple[float, bool, float, float]] = []
    sizes: list[int] = []

    def ok(rate: float) -> bool:
        good, res = judge(lambda n: simulate(wf, allocation, gpu, models, rate_rps=rate, n_requests=n, seed=seed),
                          n_requests, max_extend)
        runs.append((rate, good, res.throughput_rps, res.latency_mean_s))
        sizes.append(res.requests)
        if on_run is not None:
            on_run(rate, good, res)
        return good

    lo, hi = bisect_rate(ok, guess_rps, rel_tol=rel_tol, max_runs=max_runs, step=step)
    return CapacityResult(lo, hi, tuple(runs), tuple(sizes))


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
