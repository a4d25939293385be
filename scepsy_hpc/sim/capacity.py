"""Maximum sustainable throughput of a plan, measured in the simulator.

A rate is sustainable when every simulated request completes and the requests in the system stop
piling up. Growth is read over the arrivals after the first third: the number of requests in flight
(sampled at each arrival) is cut into 10 batches of consecutive arrivals, and the least-squares
slope of the batch means against time, over the arrival rate, is the share of arrivals that pile
up (≈ 1 − μ/λ past a capacity μ). Its standard error comes from the batch means' residuals (the
per-sample series is far too autocorrelated for its own), widened by their lag-1 memory. With
the 95% interval (Student's t, 8 degrees of freedom) the run *holds* (all of it ≤ `PILEUP`, 2%),
*grows* (all of it above) or is *undecided*. By Little's law, bounded work in progress at a steady
arrival rate is bounded mean latency; unlike a latency trend, this reading has no end effect (it
stops at the last arrival, before the system drains).

Plans with a large steady backlog (milp's at 32 GPUs: ~1,000 requests in flight, latencies of
minutes) take thousands of requests to fill, and until then their backlog grows as overload's
does. So a run is lengthened (the same arrivals and programs, more of them) when it is undecided,
or grows but decelerates (over the last third by less than ¾ of its growth over the middle third),
or spans fewer than `FILL_LATENCIES` (12) mean latencies of its early requests — straight to the
length that spans them, up to `max_extend` × the requests asked for (`judge` 4×, `max_sustainable_rate`
8×). A run still undecided or growing there goes on to twice the length that spans its latencies
(the length scales with rate × latency), up to `fill_extend` × the requests (4 × `max_extend`), unless
its backlog grows steadily by `OVERLOAD` (10%) of the arrivals or more, overload at any length. Near
capacity a plan holding ~1,000 requests in flight fills over 10,000–20,000 requests; stopped at 8×,
the judge read such plans ~25% low (reflexion at 16 GPUs, agents_handoffs at 32). At the longest
run an undecided reading falls to its point estimate. A backlog that grows at a steady pace in a run
long enough is overload, refused at once. Past capacity, fork-join workflows still complete requests
at a rate below λ and below the capacity (partly done requests pile up), so one overloaded run's
departure rate under-reads the capacity; this bisects on the rate instead.
Validated against long single runs by scripts/validate_capacity.py.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from scepsy_hpc.sim.core import GrowingRun, SimResult
from scepsy_hpc.spec.catalog import GPUSpec, ModelSpec
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import Workflow

PILEUP = 0.02        # sustainable: at most 2% of the arrivals after the first third pile up
SETTLING = 0.75      # still filling: the pile-up over the last third is below ¾ of that over the middle third
MAX_EXTEND = 4       # `judge`'s default: a filling or undecided run is doubled up to 4× the requests asked for
CAPACITY_EXTEND = 8  # `max_sustainable_rate`'s: up to 8× (a 32-GPU plan's ~1,000-request backlog fills over ~7,000)
FILL_LATENCIES = 12  # a run shorter than 12 early request latencies has not filled: it is lengthened
FILL_EXTEND = 4      # ... past `max_extend`, up to `FILL_EXTEND` × `max_extend` × the requests asked for
OVERLOAD = 0.10      # a backlog growing steadily by 10% of the arrivals is overload however short its run
CONFIRM = 0.25       # a run that grows by less than this is run once more at twice the length before it is refused:
                     # a load surge late in a short sample path reads as 10% growth (rag_rerank × 8 at 1.71 rps,
                     # 600 requests: 0.108 ± 0.029) and is gone at twice the length (−0.029 ± 0.012)
BATCHES = 10         # the in-flight series after the first third is cut into 10 batches of arrivals
T_CRIT = 2.31        # Student's t, 8 degrees of freedom (10 batch means − 2), two-sided 95%


@dataclass(frozen=True)
class CapacityResult:
    """The highest sustainable rate found, the lowest unsustainable one, and the runs made."""

    sustainable_rps: float
    unsustainable_rps: float
    runs: tuple[tuple[float, bool, float, float], ...]  # (rate, sustainable, throughput, mean latency)
    requests: tuple[int, ...] = ()                       # requests simulated per run (after extensions)


@dataclass(frozen=True)
class Growth:
    """Requests piling up per request arriving (`growth`), its standard error from batch means
    (`stderr`), and the mean requests in flight, over the arrivals after the first third."""

    growth: float
    stderr: float
    in_flight: float

    def verdict(self, pileup: float = PILEUP, t_crit: float = T_CRIT) -> str:
        """`holds` when the whole 95% interval is at most `pileup`, `grows` when it is all above,
        else `undecided`."""
        if self.growth + t_crit * self.stderr <= pileup:
            return "holds"
        if self.growth - t_crit * self.stderr > pileup:
            return "grows"
        return "undecided"


def _in_flight(res: SimResult, a: int, b: int) -> tuple[list[float], list[int]]:
    """Arrival times of requests a … b−1 and the requests in the system just after each arrives."""
    recs = res.request_records
    ends = sorted(r.t_end for r in recs if r.t_end >= 0)
    ts = [recs[i].t_arrive for i in range(a, b)]
    ws = [i + 1 - bisect.bisect_right(ends, recs[i].t_arrive) for i in range(a, b)]
    return ts, ws


def _slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ys on xs and its standard error (nan with fewer than 3 points)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return 0.0, math.nan
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if len(xs) < 3:
        return slope, math.nan
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return slope, math.sqrt(resid / (len(xs) - 2) / sxx)


def growth_interval(res: SimResult, lo: float = 1 / 3, batches: int = BATCHES) -> Growth:
    """`Growth` over arrivals ⌊lo·n⌋ … n−1 by batch means: the series of requests in flight is cut
    into `batches` runs of consecutive arrivals, and the slope of the batch means against the batch
    mean arrival times — over the arrival rate — is the growth. The requests in flight are strongly
    autocorrelated (a large backlog wanders for many arrivals), so a slope fitted to every sample
    has a standard error far too small; batch means are close to independent once a batch spans
    the backlog's memory, and their residuals give an honest one. Curvature (a run still filling)
    also shows up as residual: a wide interval, read as undecided."""
    recs = res.request_records
    n = len(recs)
    a = int(n * lo)
    if n - a < 2 * batches:
        return Growth(0.0, math.inf, 0.0)
    ts, ws = _in_flight(res, a, n)
    span = ts[-1] - ts[0]
    if span <= 0:
        return Growth(0.0, math.inf, sum(ws) / len(ws))
    rate = (len(ts) - 1) / span
    k = len(ts) // batches
    bt = [sum(ts[i * k:(i + 1) * k]) / k for i in range(batches)]
    bw = [sum(ws[i * k:(i + 1) * k]) / k for i in range(batches)]
    slope, se = _slope(bt, bw)
    return Growth(slope / rate, se * _memory(bt, bw, slope) / rate, sum(ws) / len(ws))


def _memory(xs: list[float], ys: list[float], slope: float) -> float:
    """How much a slope's standard error understates itself when the residuals still remember each
    other (batches shorter than the backlog's memory, or curvature): √((1+r)/(1−r)) for their
    lag-1 autocorrelation r ≥ 0 (the AR(1) variance factor), r capped at 0.9."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    res = [y - my - slope * (x - mx) for x, y in zip(xs, ys)]
    ss = sum(e * e for e in res)
    r = sum(a * b for a, b in zip(res, res[1:])) / ss if ss > 0 else 0.0
    r = min(max(r, 0.0), 0.9)
    return math.sqrt((1 + r) / (1 - r))


def backlog_growth(res: SimResult, lo: float = 1 / 3, hi: float = 1.0) -> float:
    """Requests piling up per request arriving, over arrivals ⌊lo·n⌋ … ⌈hi·n⌉−1: the least-squares
    slope of the requests in the system (sampled just after each arrival) against arrival time,
    over the arrival rate in that stretch. ≈ 0 when departures keep up, ≈ 1 − μ/λ past capacity μ."""
    n = len(res.request_records)
    a, b = int(n * lo), min(n, math.ceil(n * hi))
    if b - a < 10:
        return 0.0
    ts, ws = _in_flight(res, a, b)
    span = ts[-1] - ts[0]
    if span <= 0:
        return 0.0
    return _slope(ts, [float(w) for w in ws])[0] * span / (len(ts) - 1)


def is_sustainable(res: SimResult, pileup: float = PILEUP) -> bool:
    """Every request completed and, after the first third of the arrivals, the backlog provably
    does not grow by more than `pileup` per arrival (`Growth.verdict` is `holds`)."""
    return res.completed >= res.requests and growth_interval(res).verdict(pileup) == "holds"


def still_filling(res: SimResult, pileup: float = PILEUP, settling: float = SETTLING) -> bool:
    """The backlog grows after the first third but decelerates: over the last third it grows by
    less than `settling` × its growth over the middle third — a run too short for the workflow to
    reach its steady state, not overload (whose backlog grows at a steady pace)."""
    return (not is_sustainable(res, pileup)
            and backlog_growth(res, 2 / 3) < settling * backlog_growth(res, 1 / 3, 2 / 3))


def _fill_requests(res: SimResult, fill_latencies: float) -> float:
    """Requests a run needs to span `fill_latencies` × the mean latency of its first third of
    requests, at its own arrival rate (0 when it cannot tell)."""
    recs = res.request_records
    early = [r.t_end - r.t_arrive for r in recs[: len(recs) // 3] if r.t_end >= 0]
    span = recs[-1].t_arrive - recs[0].t_arrive if len(recs) > 1 else 0.0
    if not early or span <= 0:
        return 0.0
    return fill_latencies * sum(early) / len(early) * (len(recs) - 1) / span


def too_short(res: SimResult, fill_latencies: float = FILL_LATENCIES) -> bool:
    """The run's arrivals span less than `fill_latencies` × the mean latency of its first third of
    requests: too short for a workflow whose requests take that long to reach its steady backlog
    (beam search at 32 GPUs fills over ~2,000 requests and, until then, grows as steadily as
    overload does)."""
    return len(res.request_records) < _fill_requests(res, fill_latencies)


def longest_judged_run(n_requests: int, max_extend: int = MAX_EXTEND, fill_extend: int | None = None) -> int:
    """The most requests a `judge` run from `n_requests` goes to (its `fill_cap`)."""
    return max(max_extend, FILL_EXTEND * max_extend if fill_extend is None else fill_extend) * n_requests


def judge(run: Callable[[int], SimResult], n_requests: int, max_extend: int = MAX_EXTEND,
          pileup: float = PILEUP, fill_extend: int | None = None) -> tuple[bool, SimResult]:
    """Run `run(n)` from `n_requests` and read the backlog's growth with its 95% interval
    (`growth_interval`): `holds` is sustainable; `grows` is overload unless the run is still filling
    or too short for its request latency; `undecided` (noise or a fill wider than the margin) and
    a run still filling are lengthened — doubled, or straight to the multiple of `n_requests` that
    spans `FILL_LATENCIES` early latencies — up to `max_extend` × `n_requests`. Growth below
    `CONFIRM` is refused only when the run before it grew too, or at the longest run allowed: a
    surge late in a short sample path is not overload. A run whose backlog
    is undecided, still filling or growing by less than `OVERLOAD` goes on past that to twice the
    length its latency needs, up to `fill_extend` × `n_requests` (default `FILL_EXTEND` × `max_extend`). At the
    longest run allowed an undecided run is read by its point estimate. The verdict, and the last run."""
    cap = max_extend * n_requests
    fill_cap = longest_judged_run(n_requests, max_extend, fill_extend)
    n = n_requests
    grew = False   # the run before this one grew too (a pile-up below CONFIRM is refused on two lengths)
    while True:
        res = run(n)
        if res.completed < res.requests:
            return False, res
        growth = growth_interval(res)
        verdict = growth.verdict(pileup)
        if verdict == "holds":
            return True, res
        need = _fill_requests(res, FILL_LATENCIES)
        filling = verdict == "grows" and still_filling(res, pileup)
        limit = cap
        if 2 * n > cap and (verdict == "undecided" or filling or growth.growth < OVERLOAD) and n < 2 * need:
            limit = fill_cap   # past the cap: the run length scales with rate × latency (to twice its fill)
        last = 2 * n > limit
        if verdict == "grows" and (last or not (filling or n < need)) and (last or grew or growth.growth >= CONFIRM):
            return False, res
        grew = verdict == "grows"
        if last:   # undecided at the longest run allowed: the point estimate decides
            return growth.growth <= pileup, res
        n *= 2
        while 2 * n <= limit and n < need:
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
    max_extend: int = CAPACITY_EXTEND,
    on_run: Callable[[float, bool, SimResult], Any] | None = None,
    known: Mapping[float, tuple[bool, float, float, int]] | None = None,
    grow: bool = True,
) -> CapacityResult:
    """Bisect the arrival rate between a sustainable and an unsustainable one, starting near `guess_rps`.
    `on_run` hears each judged rate; `known`: rates judged by an earlier, interrupted bisection of the
    same plan and inputs (rate → sustained, throughput, mean latency, requests), taken as they were
    instead of simulated again (the bisection is deterministic given its verdicts). `grow`: a
    lengthened run goes on from the shorter one (`sim.core.GrowingRun`, the same results); False
    simulates each length afresh."""
    runs: list[tuple[float, bool, float, float]] = []
    sizes: list[int] = []

    def ok(rate: float) -> bool:
        if known and rate in known:
            good, thr, lat, n = known[rate]
            runs.append((rate, good, thr, lat))
            sizes.append(n)
            return good
        good, res = judge(GrowingRun(wf, allocation, gpu, models, rate_rps=rate, seed=seed, fork=grow), n_requests,
                          max_extend)
        runs.append((rate, good, res.throughput_rps, res.latency_mean_s))
        sizes.append(res.requests)
        if on_run is not None:
            on_run(rate, good, res)
        return good

    lo, hi = bisect_rate(ok, guess_rps, rel_tol=rel_tol, max_runs=max_runs, step=step)
    return CapacityResult(lo, hi, tuple(runs), tuple(sizes))


FAR_STEP = 2.0   # bisect_rate's largest bracketing step


def bisect_rate(ok: Callable[[float], bool], guess: float, *, rel_tol: float, max_runs: int,
                step: float) -> tuple[float, float]:
    """(highest rate `ok` accepted, lowest it refused; 0 / inf when none): step by ×`step` from
    `guess` until a sustainable and an unsustainable rate bracket the limit, then bisect to
    `rel_tol`, calling `ok` at most `max_runs` times. From the third run on, each step is the
    square of the last (up to ×`FAR_STEP`), so a limit far from the guess (a plan the predictor
    over-rates several-fold) is bracketed in a few runs, not max_runs small ones."""
    lo, hi, n = 0.0, math.inf, 0
    rate, f = guess, step
    while n < max_runs and (math.isinf(hi) or lo == 0.0):
        n += 1
        if ok(rate):
            lo = rate
            rate *= f
        else:
            hi = rate
            rate /= f
        if n >= 2:
            f = max(step, min(f * f, FAR_STEP))
    while n < max_runs and hi - lo > rel_tol * hi:
        n += 1
        mid = 0.5 * (lo + hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi
