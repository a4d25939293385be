"""Maximum sustainable throughput of a plan, measured in the simulator.

A rate is sustainable when the simulated requests complete at the arrival rate (departure rate ≥
`keep_up` × λ) and latency stays bounded: the mean latency of the last third of the measured
requests (by arrival) is at most `drift` × that of the first third — a queue that grows shows up
as latency rising across the run. Past-capacity runs of fork-join workflows still complete
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


def is_sustainable(res: SimResult, keep_up: float = 0.93, drift: float = 1.25) -> bool:
    """Departures keep up with arrivals and latency does not trend upward across the run."""
    if res.completed < res.requests:
        return False
    recs = [r for r in res.request_records[int(len(res.request_records) * res.warmup_frac):] if r.t_end >= 0]
    if len(recs) < 9:
        return res.throughput_rps >= keep_up * res.rate_rps
    k = len(recs) // 3
    first = sum(r.t_end - r.t_arrive for r in recs[:k]) / k
    last = sum(r.t_end - r.t_arrive for r in recs[-k:]) / k
    return res.throughput_rps >= keep_up * res.rate_rps and last <= drift * first


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

    lo, hi = 0.0, math.inf
    rate = guess_rps
    while len(runs) < max_runs and (math.isinf(hi) or lo == 0.0):
        if ok(rate):
            lo = rate
            rate *= step
        else:
            hi = rate
            rate /= step
    while len(runs) < max_runs and hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return CapacityResult(lo, hi, tuple(runs))
