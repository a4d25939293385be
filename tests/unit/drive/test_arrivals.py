"""Arrival processes of the drivers: closed loop keeps `concurrency` in flight, open loop follows its seeded Poisson times."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from scepsy_hpc.drive.core import RequestResult, run_arrivals


def test_closed_loop_runs_each_request_once_with_at_most_concurrency_in_flight():
    in_flight, peak, order = 0, 0, []

    async def run_one(i: int) -> RequestResult:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        order.append(i)
        await asyncio.sleep(0.001 * (i % 3))
        in_flight -= 1
        return RequestResult(f"r-{i}", "ok", 0.0)

    results, _ = asyncio.run(run_arrivals(run_one, 10, rate_rps=None, concurrency=3, seed=0, time_scale=1.0))
    assert [r.request for r in results] == [f"r-{i}" for i in range(10)]
    assert order == list(range(10)) and peak == 3


def test_open_loop_starts_requests_at_the_seeded_poisson_times_scaled_to_wall():
    rate, n, scale = 20.0, 15, 0.1
    rng = random.Random("5/arrivals")
    expected = [0.0]
    for _ in range(n - 1):
        expected.append(expected[-1] + rng.expovariate(rate) * scale)
    starts: list[float] = []

    async def run_one(i: int) -> RequestResult:
        starts.append(time.monotonic())
        await asyncio.sleep(0.05)  # longer than most gaps: an open loop does not wait for completions
        return RequestResult(f"r-{i}", "ok", 0.0)

    results, wall_s = asyncio.run(run_arrivals(run_one, n, rate_rps=rate, concurrency=None, seed=5, time_scale=scale))
    offsets = [s - starts[0] for s in starts]
    assert len(results) == n
    assert all(abs(got - want) < 0.02 for got, want in zip(offsets, expected)), (offsets, expected)
    assert wall_s >= expected[-1] + 0.05


@pytest.mark.parametrize("kwargs, what", [
    ({"rate_rps": 0.0, "concurrency": None}, "rate_rps must be > 0"),
    ({"rate_rps": None, "concurrency": 0}, "concurrency must be >= 1"),
])
def test_bad_arrival_parameters(kwargs, what):
    async def run_one(i: int) -> RequestResult:
        return RequestResult(f"r-{i}", "ok", 0.0)

    with pytest.raises(ValueError) as exc:
        asyncio.run(run_arrivals(run_one, 1, seed=0, time_scale=1.0, **kwargs))
    assert what in str(exc.value)
