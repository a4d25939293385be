"""The saturation sweep: raise the offered rate until the engine saturates, then fill a grid.

Phase 1 climbs geometrically from `start_rps` until a point is saturated — its completed-call rate
falls below `plateau` × offered (throughput plateau) or its mean latency exceeds `blowup` × the
unloaded latency (latency blow-up) — and measures once more at `overload` × that rate; capacity is
the mean completed-call rate of those two saturated points (the plateau). With `bracket` (short
runs against a live engine, whose overload throughput reads poorly) it is kept between the last
rate that kept up and the first that did not, and below any grid rate that fell behind; long
simulated runs read the plateau well and near-capacity grid points badly, so they do without. Phase 2 measures at `fractions` of the
capacity where phase 1 left no point within `gap` (relative), so the curve is dense where latency
bends. The sweep knows nothing of engines: `measure(rate)` does the work (simulated or over HTTP).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from scepsy_hpc.errors import EngineError
from scepsy_hpc.profile.table import ProfilePoint

FRACTIONS = (0.15, 0.3, 0.45, 0.6, 0.7, 0.8, 0.87, 0.93)


@dataclass(frozen=True)
class SweepResult:
    """Points in rate order (saturated ones flagged) and the capacity found."""

    points: tuple[ProfilePoint, ...]
    capacity_rps: float


def is_saturated(p: ProfilePoint, base_latency_s: float, plateau: float, blowup: float) -> bool:
    """Throughput plateau or latency blow-up at this point."""
    if p.calls == 0 or p.saturated:
        return True  # (a measurement may already know, e.g. from latency rising through the run)
    return p.throughput_rps < plateau * p.rate_rps or p.latency_mean_s > blowup * base_latency_s


def sweep(
    measure: Callable[[float], ProfilePoint],
    start_rps: float,
    *,
    growth: float = 1.6,
    plateau: float = 0.9,
    blowup: float = 8.0,
    overload: float = 1.5,
    fractions: tuple[float, ...] = FRACTIONS,
    gap: float = 0.04,
    max_steps: int = 40,
    on_point: Callable[[ProfilePoint], None] | None = None,
    bracket: bool = False,
) -> SweepResult:
    """Measure from `start_rps` up to saturation, then at `fractions` of the capacity found."""
    if start_rps <= 0:
        raise ValueError("start_rps must be > 0")
    points: list[ProfilePoint] = []

    def take(rate: float) -> ProfilePoint:
        p = measure(rate)
        if on_point is not None:
            on_point(p)
        return p

    base = take(start_rps)
    if base.calls == 0:
        raise EngineError(f"no call completed at the lowest rate {start_rps:.3g} calls/s: the endpoint does not answer")
    points.append(base)
    rate = start_rps
    saturated: list[ProfilePoint] = []
    for _ in range(max_steps):
        rate *= growth
        p = take(rate)
        if is_saturated(p, base.latency_mean_s, plateau, blowup):
            saturated.append(replace(p, saturated=True))
            q = take(rate * overload)
            saturated.append(replace(q, saturated=True))
            break
        points.append(p)
    else:
        raise EngineError(f"no saturation up to {rate:.3g} calls/s after {max_steps} steps; raise max_steps or start higher")
    capacity = sum(p.throughput_rps for p in saturated) / len(saturated)  # the plateau, averaged
    if bracket:  # short runs against a live engine read overload throughput poorly: trust the climb
        capacity = min(max(capacity, points[-1].rate_rps), saturated[0].rate_rps)
    behind: list[float] = []  # grid rates where the engine did not keep up (not mere latency growth)
    for f in fractions:
        r = f * capacity
        if r <= start_rps or any(abs(p.rate_rps - r) <= gap * r for p in points):
            continue
        p = take(r)
        if p.calls == 0 or p.saturated or p.throughput_rps < plateau * r:
            behind.append(r)
        points.append(replace(p, saturated=is_saturated(p, base.latency_mean_s, plateau, blowup) or r >= capacity))
    if bracket and behind:  # the grid found the engine falling behind below the estimate: believe it
        capacity = max(min(capacity, min(behind)), max((p.rate_rps for p in points if not p.saturated), default=0.0))
    pts = [replace(p, saturated=True) if p.rate_rps >= capacity else p for p in points]
    return SweepResult(tuple(sorted(pts + saturated, key=lambda p: p.rate_rps)), capacity)
