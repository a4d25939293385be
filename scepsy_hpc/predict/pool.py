"""A pool of unlike replicas of one LLM (a mixed group) as one equivalent replica, for the predictors.

The gateway and the simulator route a mixed group's call to the replica with a free slot whose
(outstanding + 1) / w is least, w its capacity weight. So, in the steady state, arrivals find every
replica in use at about the same (L_c + 1) / w_c = K, where L_c = x_c · T_c(x_c) is the calls a replica
of configuration c holds at its call rate x_c (Little's law, T_c its profile's mean call latency at
that load); a configuration with 1 / w_c > K gets no calls. Given the LLM's calls/s λ, K is the level
at which Σ_c n_c x_c = λ (n_c replicas of each). At low load that sends almost every call to the
fastest configuration; near capacity the split approaches the capacity shares n_c μ_c / M, M = Σ n_c μ_c.

A call lands on configuration c with probability s_c = n_c x_c / λ and meets that configuration's
per-call model at load x_c. A call's latency is linear in the model's coefficients
(a + b·prompt + tpot·(output − 1)), so its expectation is the s_c-weighted mean of the coefficients.
So a pool of R = Σ n_c replicas predicts as R replicas of one "average" configuration whose capacity
is M / R and whose per-call model at per-replica load λ / R is that mixture. Percentiles are averaged
the same way (an approximation: a mixture's percentile is not the mean of percentiles). Pooling across
the shared FIFO then applies to R replicas as for like ones.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import replace
from typing import Sequence

from scepsy_hpc.profile.table import ProfilePoint, ProfileTable

GRID = 24     # utilisation points between the lowest measured load and the highest all configurations reach
_INV = 48     # load points per configuration of the held-calls curve L(x) = x·T(x)


class Held:
    """One configuration's calls held per replica against its call rate, L(x) = x·T(x), and its inverse,
    up to the highest load its profile covers below capacity (build once per profile: `split` uses it)."""

    def __init__(self, t: ProfileTable) -> None:
        self.t = t
        top = _top([(t, 1)])
        self.xs = [top * t.capacity_rps * k / _INV for k in range(_INV + 1)]
        self.ls = []
        for x in self.xs:
            p = t.point_at(x)
            self.ls.append(x * p.latency_mean_s if p is not None else math.inf)

    def rate_for(self, held: float) -> float:
        """The call rate at which a replica holds `held` calls (capped at the highest load of the curve)."""
        if held <= 0:
            return 0.0
        i = bisect.bisect_left(self.ls, held)
        if i >= len(self.ls):
            return self.xs[-1]
        lo_x, hi_x, lo_l, hi_l = self.xs[i - 1], self.xs[i], self.ls[i - 1], self.ls[i]
        return lo_x + (hi_x - lo_x) * (held - lo_l) / (hi_l - lo_l) if hi_l > lo_l else hi_x


def split(parts: Sequence[tuple[ProfileTable, int]], weights: Sequence[float], calls_rps: float,
          held: Sequence[Held] | None = None) -> list[float]:
    """Per configuration, the calls/s one of its replicas gets when the pool takes `calls_rps` (see the
    module docstring: the level K at which arrivals find (L_c + 1) / w_c equal)."""
    curves = held or [Held(t) for t, _ in parts]
    if calls_rps <= 0:
        return [0.0] * len(parts)

    def total(k: float) -> tuple[float, list[float]]:
        xs = [c.rate_for(k * w - 1.0) for c, w in zip(curves, weights)]
        return sum(n * x for (_, n), x in zip(parts, xs)), xs

    lo, hi = 0.0, 1.0 / min(weights)
    while total(hi)[0] < calls_rps and hi < 1e12:
        hi *= 2.0
    for _ in range(60):
        if hi - lo <= 1e-7 * hi:
            break
        mid = (lo + hi) / 2
        if total(mid)[0] < calls_rps:
            lo = mid
        else:
            hi = mid
    got, xs = total(hi)
    return [x * calls_rps / got for x in xs] if got > 0 else xs


def _top(parts: Sequence[tuple[ProfileTable, int]]) -> float:
    """The highest utilisation every configuration's profile covers."""
    return min(max((p.rate_rps for p in t.points if not p.saturated and p.calls > 0), default=0.0) / t.capacity_rps
               for t, _ in parts)


def pool_profile(parts: Sequence[tuple[ProfileTable, int]], weights: Sequence[float] | None = None) -> ProfileTable:
    """The equivalent replica of a pool of `count` replicas of each profile in `parts`, routed by the
    capacity `weights` (default: the profiles' capacities), see the module docstring. One part is
    returned as it is."""
    if weights is not None and len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights for {len(parts)} configurations")
    weights = [w for (_, n), w in zip(parts, weights)] if weights is not None else [t.capacity_rps for t, _ in parts]
    keep = [i for i, (_, n) in enumerate(parts) if n > 0]
    parts, weights = [parts[i] for i in keep], [weights[i] for i in keep]
    if not parts:
        raise ValueError("a pool needs at least one replica")
    if len(parts) == 1:
        return parts[0][0]
    if any(t.capacity_rps <= 0 for t, _ in parts):
        bad = next(t for t, _ in parts if t.capacity_rps <= 0)
        raise ValueError(f"profile of {bad.llm} tp={bad.tp} gpu_frac={bad.gpu_frac:g} has no capacity")
    if not all(w > 0 for w in weights):
        raise ValueError(f"weights {weights} must be positive")
    total = sum(n * t.capacity_rps for t, n in parts)
    replicas = sum(n for _, n in parts)
    # utilisations where some part has a measured point, plus an even grid, up to the highest every part reaches
    top = _top(parts)
    low = max(min((p.rate_rps for p in t.points if not p.saturated and p.calls > 0), default=0.0) / t.capacity_rps
              for t, _ in parts)
    if top <= 0:
        raise ValueError(f"a profile of {parts[0][0].llm} has no unsaturated point")
    rhos = {low + (top - low) * k / GRID for k in range(GRID + 1)}
    for t, _ in parts:
        rhos.update(p.rate_rps / t.capacity_rps for p in t.points
                    if not p.saturated and p.calls > 0 and low <= p.rate_rps / t.capacity_rps <= top)
    mean_cap = total / replicas
    curves = [Held(t) for t, _ in parts]
    points = []
    for rho in sorted(rhos):
        lam = rho * total
        xs = split(parts, weights, lam, curves)
        ps = [t.point_at(x) for (t, _), x in zip(parts, xs)]
        if any(p is None for p in ps):
            break
        shares = [n * x / lam for (_, n), x in zip(parts, xs)]
        points.append(_mix([p for p in ps if p is not None], shares, rho * mean_cap))
    first = max(parts, key=lambda tn: tn[1] * tn[0].capacity_rps)[0]
    label = " + ".join(f"{n}×{'tp' + str(t.tp) if t.gpu_frac >= 1 else 'f' + format(t.gpu_frac, 'g')}" for t, n in parts)
    return replace(first, capacity_rps=mean_cap, points=tuple(points), replicas=min(t.replicas for t, _ in parts),
                   max_num_seqs=min(t.max_num_seqs for t, _ in parts),
                   arrivals="requests" if all(t.arrivals == "requests" for t, _ in parts) else "poisson",
                   source="measured" if all(t.source == "measured" for t, _ in parts) else "synthetic",
                   workload={**first.workload, "pool": label})


def _mix(points: Sequence[ProfilePoint], shares: Sequence[float], rate: float) -> ProfilePoint:
    def avg(field: str) -> float:
        return sum(s * getattr(p, field) for p, s in zip(points, shares))

    return ProfilePoint(rate_rps=rate, throughput_rps=rate, calls=sum(p.calls for p in points) or 1,
                        latency_mean_s=avg("latency_mean_s"), latency_p50_s=avg("latency_p50_s"),
                        latency_p90_s=avg("latency_p90_s"), latency_p99_s=avg("latency_p99_s"),
                        ttft_mean_s=avg("ttft_mean_s"), ttft_a_s=avg("ttft_a_s"), ttft_b_s=avg("ttft_b_s"),
                        tpot_s=avg("tpot_s"))


def pool_point(parts: Sequence[tuple[ProfileTable, int]], weights: Sequence[float], calls_rps: float,
               held: Sequence[Held] | None = None) -> ProfilePoint | None:
    """The pool's per-call model when it takes `calls_rps` in all (module docstring): each configuration's
    point at its share of the split, with pooling over all the pool's replicas behind the shared FIFO,
    mixed by the split. None when a configuration would be past its capacity. For one price, without
    building the pool's whole table (`pool_profile`)."""
    from scepsy_hpc.predict.alp import pooled_point

    keep = [i for i, (_, n) in enumerate(parts) if n > 0]
    curves = [held[i] for i in keep] if held is not None else None
    parts, weights = [parts[i] for i in keep], [weights[i] for i in keep]
    total = sum(n for _, n in parts)
    xs = split(parts, weights, calls_rps, curves)
    if calls_rps <= 0:
        xs = [0.0] * len(parts)
    points = []
    for (t, _), x in zip(parts, xs):
        p = pooled_point(t, x, total)
        if p is None:
            return None
        points.append(p)
    shares = [n * x / calls_rps for (_, n), x in zip(parts, xs)] if calls_rps > 0 else \
        [1.0 if i == max(range(len(parts)), key=lambda k: weights[k]) else 0.0 for i in range(len(parts))]
    return _mix(points, shares, calls_rps / total)
