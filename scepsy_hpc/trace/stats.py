"""WorkflowStats: per-LLM statistics of a set of request graphs (traced or sampled).

For LLM m over the successful requests R:
  n_m      mean calls per request
  p_m      intra-request parallelism: Σ call time of m ÷ Σ time at least one call of m runs
           (so n_m · L_m / p_m is the time m is active per request: the paper's stage time)
  share_m  m's share of all LLM call time, per request; its mean and coefficient of variation
           across requests (the stability Scepsy relies on), next to the CV of end-to-end latency
  cp_m     mean time per request that m spends on the critical path; tools and orchestration gaps
           on the critical path are reported apart
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from scepsy_hpc.trace.graph import CALL, RequestGraph
from scepsy_hpc.trace.records import CallRecord


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _cv(xs: Sequence[float]) -> float:
    m = _mean(xs)
    if not xs or m == 0 or math.isnan(m):
        return math.nan
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)) / m


def _pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass(frozen=True)
class TokenStats:
    """A token-count distribution: mean, CV and quantiles."""

    mean: float
    cv: float
    p50: float
    p90: float
    p99: float

    @staticmethod
    def of(xs: Sequence[float]) -> "TokenStats":
        """Summary of `xs`."""
        return TokenStats(_mean(xs), _cv(xs), _pct(xs, 0.5), _pct(xs, 0.9), _pct(xs, 0.99))


@dataclass(frozen=True)
class RoleStats:
    """One role of an LLM: calls per request and token profile."""

    calls_per_request: float
    prompt_tokens: TokenStats
    output_tokens: TokenStats


@dataclass(frozen=True)
class LLMWorkStats:
    """One LLM's statistics across requests."""

    llm: str
    calls: int
    n: float
    p: float
    call_latency_mean_s: float
    prompt_tokens: TokenStats
    output_tokens: TokenStats
    share_mean: float
    share_cv: float
    cp_time_mean_s: float
    cp_share: float
    roles: dict[str, RoleStats] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkflowStats:
    """Statistics of a workflow's requests."""

    workflow: str
    requests: int
    failed: int
    latency_mean_s: float
    latency_cv: float
    llm_time_mean_s: float
    tool_cp_mean_s: float
    gap_cp_mean_s: float
    per_llm: dict[str, LLMWorkStats]
    tool_cp_by_name: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _union(intervals: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def aggregate(graphs: Iterable[RequestGraph], workflow: str = "", llms: Sequence[str] = ()) -> WorkflowStats:
    """WorkflowStats of the successful requests among `graphs`; `llms` lists LLMs to report even if never called."""
    graphs = list(graphs)
    good = [g for g in graphs if g.ok]
    names: dict[str, None] = dict.fromkeys(llms)
    for g in good:
        for n in g.nodes:
            if n.kind == CALL:
                names.setdefault(n.name, None)
    calls = {m: 0 for m in names}
    busy = {m: 0.0 for m in names}
    active = {m: 0.0 for m in names}
    lat_sum = {m: 0.0 for m in names}
    shares: dict[str, list[float]] = {m: [] for m in names}
    cp = {m: 0.0 for m in names}
    prompts: dict[str, list[float]] = {m: [] for m in names}
    outputs: dict[str, list[float]] = {m: [] for m in names}
    roles: dict[str, dict[str, list[tuple[int, int]]]] = {m: {} for m in names}
    latencies: list[float] = []
    llm_time: list[float] = []
    tool_cp = gap_cp = 0.0
    tool_names: dict[str, float] = {}
    for g in good:
        fin = g.finish_times()
        per: dict[str, list[tuple[float, float]]] = {}
        for n, f in zip(g.nodes, fin):
            if n.kind != CALL:
                continue
            per.setdefault(n.name, []).append((f - n.duration_s, f))
            calls[n.name] += 1
            lat_sum[n.name] += n.duration_s
            prompts[n.name].append(n.prompt_tokens)
            outputs[n.name].append(n.output_tokens)
            roles[n.name].setdefault(n.role or "", []).append((n.prompt_tokens, n.output_tokens))
        total = sum(e - s for iv in per.values() for s, e in iv)
        llm_time.append(total)
        for m in names:
            iv = per.get(m, [])
            t = sum(e - s for s, e in iv)
            busy[m] += t
            active[m] += _union(iv)
            if total > 0:
                shares[m].append(t / total)
        for i in g.critical_path():
            n = g.nodes[i]
            gap_cp += n.gap_s
            if n.kind == CALL:
                cp[n.name] += n.duration_s
            else:
                tool_cp += n.duration_s
                tool_names[n.name] = tool_names.get(n.name, 0.0) + n.duration_s
        gap_cp += g.tail_s
        latencies.append(g.latency_s if g.latency_s is not None else g.latency())
    nr = len(good)
    lat_mean = _mean(latencies)
    per_llm = {}
    for m in names:
        rs = {r: RoleStats(len(v) / nr, TokenStats.of([a for a, _ in v]), TokenStats.of([b for _, b in v]))
              for r, v in roles[m].items()} if nr else {}
        per_llm[m] = LLMWorkStats(
            llm=m, calls=calls[m], n=calls[m] / nr if nr else math.nan,
            p=busy[m] / active[m] if active[m] > 0 else 1.0,
            call_latency_mean_s=lat_sum[m] / calls[m] if calls[m] else math.nan,
            prompt_tokens=TokenStats.of(prompts[m]), output_tokens=TokenStats.of(outputs[m]),
            share_mean=_mean(shares[m]), share_cv=_cv(shares[m]),
            cp_time_mean_s=cp[m] / nr if nr else math.nan,
            cp_share=cp[m] / nr / lat_mean if nr and lat_mean > 0 else math.nan,
            roles=rs)
    return WorkflowStats(
        workflow=workflow, requests=nr, failed=len(graphs) - nr, latency_mean_s=lat_mean,
        latency_cv=_cv(latencies), llm_time_mean_s=_mean(llm_time),
        tool_cp_mean_s=tool_cp / nr if nr else math.nan, gap_cp_mean_s=gap_cp / nr if nr else math.nan,
        per_llm=per_llm, tool_cp_by_name={k: v / nr for k, v in tool_names.items()} if nr else {})


def call_mix(graphs: Iterable[RequestGraph]) -> dict[str, list[tuple[int, ...]]]:
    """Per LLM, the (prompt, output) tokens of every call of the successful requests: what a profiler replays;
    (prompt, output, cached) for a call a warm prefix cache serves in part (as `predict.inputs.sample_mix`)."""
    mix: dict[str, list[tuple[int, ...]]] = {}
    for g in graphs:
        if not g.ok:
            continue
        for n in g.nodes:
            if n.kind == CALL:
                mix.setdefault(n.name, []).append((n.prompt_tokens, n.output_tokens, n.cached_tokens)
                                                  if n.cached_tokens else (n.prompt_tokens, n.output_tokens))
    return mix


def call_patterns(graphs: Iterable[RequestGraph]) -> dict[str, list[list[tuple[float, int, int]]]]:
    """Per LLM, per successful request that calls it, its calls as (start offset from the request's
    first call of that LLM, prompt, output): fan-out bursts and spacing, for request-shaped replay."""
    out: dict[str, list[list[tuple[float, int, int]]]] = {}
    for g in graphs:
        if not g.ok:
            continue
        fin = g.finish_times()
        per: dict[str, list[tuple[float, int, int]]] = {}
        for n, f in zip(g.nodes, fin):
            if n.kind == CALL:
                per.setdefault(n.name, []).append((f - n.duration_s, n.prompt_tokens, n.output_tokens))
        for m, calls in per.items():
            t0 = min(c[0] for c in calls)
            out.setdefault(m, []).append(sorted((s - t0, p, o) for s, p, o in calls))
    return out


@dataclass(frozen=True)
class PrefixShare:
    """How much of one LLM's (or role's) prompts a prefix cache could reuse, by the gateway's accounting:
    the mean over measured calls of prefix_tokens / prompt_tokens (shared with the request's earlier
    calls) and system_tokens / prompt_tokens (shared with other requests)."""

    calls: int                 # calls with both counts and a prompt size (older traces: 0)
    prefix_share_mean: float   # nan without measured calls
    system_share_mean: float


def prefix_shares(calls: Iterable[CallRecord]) -> dict[str, dict[str, PrefixShare]]:
    """Per LLM, per role ("" for calls without one, "*" for all of the LLM's calls): the mean shared shares
    of successful calls' prompts (what `scepsy trace` may print beside the token statistics)."""
    acc: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for c in calls:
        if c.status != "ok" or not c.prompt_tokens or c.system_tokens is None:
            continue
        pre = (c.prefix_tokens or 0) / c.prompt_tokens   # None (a call without a request): nothing of its own
        sys_ = c.system_tokens / c.prompt_tokens
        per = acc.setdefault(c.llm, {})
        for role in (c.role or "", "*"):
            per.setdefault(role, []).append((min(pre, 1.0), min(sys_, 1.0)))
    return {llm: {role: PrefixShare(len(v), _mean([a for a, _ in v]), _mean([b for _, b in v]))
                  for role, v in sorted(per.items())} for llm, per in sorted(acc.items())}
