"""Aggregate LLM Pipeline (ALP) predictors (DESIGN.md §4).

Inputs: request graphs (traced, or sampled from the workflow's program), one ProfileTable per LLM
for the allocated configuration (tp, gpu_frac), the replica count r_m, and the workflow rate λ.
LLM m then receives x_m = λ·n_m / r_m calls/s per replica.

`alp-paper` (Scepsy §3, kept as the reference):
    latency    = Σ_m L_m(x_m) · n_m / p_m
    throughput = min_m r_m · μ_m / n_m
with L_m the profile's mean per-call latency and μ_m its per-replica capacity.

`alp-cp` (ours) keeps the throughput formula but prices every call of every request graph by the
profile's per-call model at load x_m — latency(prompt, output) = a + b·prompt + tpot·(output − 1),
so roles with different token profiles keep their own cost — and evaluates each graph's critical
path: calls of different LLMs that overlap stay concurrent, tool waits and orchestration gaps
keep their traced (or sampled) durations. The predicted latency is the mean over the graphs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

from scepsy_hpc.errors import SpecError
from scepsy_hpc.profile.table import ProfilePoint, ProfileTable
from scepsy_hpc.trace.graph import CALL, Node, RequestGraph
from scepsy_hpc.trace.stats import WorkflowStats, aggregate

PREDICTORS = ("alp-cp", "alp-paper")


@dataclass(frozen=True)
class LLMPrediction:
    """One LLM under the allocation at the given rate."""

    llm: str
    replicas: int
    calls_per_request: float
    load_rps: float          # calls/s offered to each replica
    capacity_rps: float      # calls/s all replicas can complete
    utilisation: float       # offered ÷ capacity
    call_latency_s: float    # mean per-call latency at this load (inf when saturated)
    stage_s: float           # the LLM's term in the prediction (alp-paper: L·n/p; alp-cp: critical-path time)


@dataclass(frozen=True)
class Prediction:
    """A predictor's answer for one allocation and rate."""

    predictor: str
    rate_rps: float
    latency_s: float
    throughput_rps: float
    bottleneck_llm: str
    per_llm: dict[str, LLMPrediction]
    tool_s: float = 0.0
    # alp-cp with keep_paths: per good graph, the indices of its critical-path nodes (not serialised)
    paths: tuple[tuple[int, ...], ...] | None = None

    @property
    def saturated(self) -> bool:
        """True when the rate is at or past the predicted throughput."""
        return self.rate_rps >= self.throughput_rps

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (inf as None)."""
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v
        d = asdict(self)
        d.pop("paths", None)
        return clean(d)


def _check(stats: WorkflowStats, profiles: Mapping[str, ProfileTable], replicas: Mapping[str, int]) -> None:
    missing = [m for m, s in stats.per_llm.items() if s.calls and m not in profiles]
    if missing:
        raise SpecError(f"no profile for LLM(s) {', '.join(missing)}; profile them (`scepsy profile`) or drop --profiles to synthesise")
    no_rep = [m for m, s in stats.per_llm.items() if s.calls and replicas.get(m, 0) < 1]
    if no_rep:
        raise SpecError(f"the allocation gives no replica to LLM(s) {', '.join(no_rep)} that the workflow calls")


def _loads(stats: WorkflowStats, profiles: Mapping[str, ProfileTable], replicas: Mapping[str, int],
           rate_rps: float, extra: Mapping[str, float] | None = None) -> tuple[dict[str, float], dict[str, float], float, str]:
    """Calls/s per replica (this workflow's plus `extra`, other workflows' calls/s on a shared
    deployment), capacity per LLM, and the workflow throughput with the other load held fixed."""
    loads, caps = {}, {}
    thr, neck = math.inf, ""
    extra = extra or {}
    for m, s in stats.per_llm.items():
        if not s.calls:
            continue
        r = replicas[m]
        loads[m] = (rate_rps * s.n + extra.get(m, 0.0)) / r
        caps[m] = r * profiles[m].capacity_rps
        t = max(caps[m] - extra.get(m, 0.0), 0.0) / s.n
        if t < thr:
            thr, neck = t, m
    return loads, caps, thr, neck


def pooling_factor(replicas: int, rho: float) -> float:
    """Queueing wait of `replicas` servers sharing one FIFO over that of one server at the same
    utilisation `rho` (Sakasegawa's M/M/c approximation: W_c/W_1 ≈ ρ^(√(2(c+1))−2) / c)."""
    if replicas <= 1 or rho <= 0:
        return 1.0
    return min(1.0, rho ** (math.sqrt(2 * (replicas + 1)) - 2) / replicas)


def pooled_point(profile: ProfileTable, load_rps: float, replicas: int) -> ProfilePoint | None:
    """The per-call model at `load_rps` per replica when `replicas` replicas share the gateway queue.

    A profile is measured on one replica. Replicas behind one FIFO wait less for admission than a
    lone replica at the same utilisation, so the part of the TTFT intercept that load adds (the
    admission wait) shrinks by the pooling factor; per-token decode time does not pool (each
    replica's batch is as large as a lone replica's at that load)."""
    p = profile.point_at(load_rps)
    if p is None or replicas <= profile.replicas:
        return p  # measured with this many replicas (or more) behind one queue: pooling is in it
    base = profile.unloaded
    k = pooling_factor(replicas, load_rps / profile.capacity_rps)
    wait = max(p.ttft_a_s - base.ttft_a_s, 0.0)
    a = base.ttft_a_s + wait * k
    return replace(p, ttft_a_s=a, ttft_mean_s=p.ttft_mean_s - (p.ttft_a_s - a),
                   latency_mean_s=p.latency_mean_s - (p.ttft_a_s - a))


def predict_paper(stats: WorkflowStats, profiles: Mapping[str, ProfileTable], replicas: Mapping[str, int],
                  rate_rps: float, extra_load: Mapping[str, float] | None = None) -> Prediction:
    """The paper's ALP: Σ_m L_m(λ n_m / r_m)·n_m/p_m and min_m r_m μ_m / n_m."""
    _check(stats, profiles, replicas)
    loads, caps, thr, neck = _loads(stats, profiles, replicas, rate_rps, extra_load)
    per: dict[str, LLMPrediction] = {}
    total = 0.0
    for m, x in loads.items():
        s = stats.per_llm[m]
        lat = profiles[m].latency_at(x)
        stage = lat * s.n / s.p
        total += stage
        per[m] = LLMPrediction(m, replicas[m], s.n, x, caps[m], x * replicas[m] / caps[m], lat, stage)
    return Prediction("alp-paper", rate_rps, total, thr, neck, per)


def predict_cp(graphs: Sequence[RequestGraph], profiles: Mapping[str, ProfileTable], replicas: Mapping[str, int],
               rate_rps: float, stats: WorkflowStats | None = None, extra_load: Mapping[str, float] | None = None,
               keep_paths: bool = False) -> Prediction:
    """Ours: every call priced at its LLM's load by its own size, tools kept, critical path evaluated.
    `extra_load`: calls/s other workflows send to a shared deployment; `keep_paths`: keep each
    graph's critical path (the allocation planner re-weights its costs by them)."""
    stats = stats or aggregate(graphs)
    _check(stats, profiles, replicas)
    loads, caps, thr, neck = _loads(stats, profiles, replicas, rate_rps, extra_load)
    points = {m: pooled_point(profiles[m], x, replicas[m]) for m, x in loads.items()}
    shaped = {m: profiles[m].arrivals == "requests" for m in loads}
    per_lat = {m: (p.latency_mean_s if p is not None else math.inf) for m, p in points.items()}
    cp = {m: 0.0 for m in loads}
    paths: list[tuple[int, ...]] = []
    if any(p is None for p in points.values()):
        latency, tool = math.inf, math.nan
        cp = {m: (math.inf if points[m] is None else math.nan) for m in loads}
    else:
        good = [g for g in graphs if g.ok]
        total = tool = 0.0
        for g in good:
            d = _burst_durations(g, points, replicas, shaped)
            total += g.latency(lambda n, _d=d: _d[id(n)])
            path = g.critical_path(lambda n, _d=d: _d[id(n)])
            if keep_paths:
                paths.append(tuple(path))
            for i in path:
                n = g.nodes[i]
                if n.kind == CALL:
                    cp[n.name] += d[id(n)]
                else:
                    tool += n.duration_s
                tool += n.gap_s
            tool += g.tail_s
        k = len(good) or 1
        latency, tool = total / k, tool / k
        cp = {m: v / k for m, v in cp.items()}
    per = {m: LLMPrediction(m, replicas[m], stats.per_llm[m].n, x, caps[m], x * replicas[m] / caps[m],
                            per_lat[m], cp[m]) for m, x in loads.items()}
    return Prediction("alp-cp", rate_rps, latency, thr, neck, per, tool, tuple(paths) if keep_paths else None)


def _burst_durations(g: RequestGraph, points: Mapping[str, ProfilePoint], replicas: Mapping[str, int],
                     shaped: Mapping[str, bool]) -> dict[int, float]:
    """Each node's duration under the per-call models, with fan-out bursts priced together.

    Calls of one LLM released at once (same dependencies: a fan-out) reach the engine together;
    the gateway spreads them over the replicas in turn and each replica prefills its share one
    chunk after another, so a call's first token waits for the prompts ahead of it in the burst
    on its replica: its prompt term uses the cumulative prompt tokens (a Poisson profile sees
    such calls one at a time and would price each alone). A profile measured with request-shaped
    arrivals (`shaped`) has the bursts in it already."""
    out: dict[int, float] = {}
    bursts: dict[tuple[str, tuple[int, ...]], list[Node]] = {}
    for n in g.nodes:
        if n.kind == CALL:
            bursts.setdefault((n.name, n.deps), []).append(n)
        else:
            out[id(n)] = n.duration_s
    for (m, _), members in bursts.items():
        p = points[m]
        if len(members) == 1 or shaped.get(m):
            for n in members:
                out[id(n)] = p.call_latency(n.prompt_tokens, n.output_tokens)
            continue
        r = max(1, replicas.get(m, 1))
        ahead = [0.0] * r
        for i, n in enumerate(sorted(members, key=lambda x: x.gap_s)):
            ahead[i % r] += n.prompt_tokens
            out[id(n)] = p.call_latency(ahead[i % r], n.output_tokens)
    return out


def predict(predictor: str, graphs: Sequence[RequestGraph], profiles: Mapping[str, ProfileTable],
            replicas: Mapping[str, int], rate_rps: float, stats: WorkflowStats | None = None,
            extra_load: Mapping[str, float] | None = None) -> Prediction:
    """Dispatch to `alp-cp` or `alp-paper`."""
    stats = stats or aggregate(graphs)
    if predictor == "alp-paper":
        return predict_paper(stats, profiles, replicas, rate_rps, extra_load)
    if predictor == "alp-cp":
        return predict_cp(graphs, profiles, replicas, rate_rps, stats, extra_load)
    raise SpecError(f"unknown predictor {predictor!r}; choose one of {', '.join(PREDICTORS)}")
