"""Arrival processes: when requests (or calls) reach the system."""

from __future__ import annotations

import random


def poisson_arrivals(rate_rps: float, n: int, rng: random.Random) -> list[float]:
    """`n` Poisson arrival times at `rate_rps`, starting after an exponential gap."""
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate_rps)
        out.append(t)
    return out
