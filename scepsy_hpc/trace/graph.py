"""Request graphs: one workflow request as calls and tool waits with their dependencies.

A node starts `gap_s` after the last of its dependencies ends (after the request starts when it
has none) and runs for `duration_s`. Evaluating a graph with other call durations — the latencies
some allocation would give — yields that request's latency under it, along its critical path; this
is how `alp-cp` predicts, and how concurrency between different LLMs is kept instead of summed.

Graphs come from a sampled program (the structure is exact; tool waits are nodes) or from a trace
(the structure is inferred: a call depends on the call or tool that ended last before it started,
and the time between is its gap — orchestration or an unrecorded tool). `tail_s` is the time from
the last node's end to the request's end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from scepsy_hpc.perf.prefix import BLOCK_TOKENS, max_hit_tokens
from scepsy_hpc.workload.sampler import Call, Tool
from scepsy_hpc.trace.records import CallRecord, SpanRecord, Trace

CALL, TOOL = "call", "tool"
EPS_S = 1e-9


@dataclass(frozen=True, slots=True)
class Node:
    """A call (llm set) or a tool wait (name set) of one request."""

    kind: str
    name: str
    role: str | None
    prompt_tokens: int
    output_tokens: int
    duration_s: float
    deps: tuple[int, ...]
    gap_s: float = 0.0
    cached_tokens: int = 0   # of the prompt, what a warm prefix cache reuses (traced: the gateway's counts)


@dataclass(frozen=True)
class RequestGraph:
    """One request: nodes in topological order, the tail after the last node, status."""

    request: str
    nodes: tuple[Node, ...]
    tail_s: float = 0.0
    ok: bool = True
    latency_s: float | None = None  # observed end-to-end latency, when traced
    meta: dict[str, Any] = field(default_factory=dict)

    def finish_times(self, duration: Callable[[Node], float] | None = None) -> list[float]:
        """Each node's finish time when nodes take `duration(node)` (default: their own)."""
        fin: list[float] = []
        for n in self.nodes:
            start = max((fin[d] for d in n.deps), default=0.0) + n.gap_s
            fin.append(start + (n.duration_s if duration is None else duration(n)))
        return fin

    def latency(self, duration: Callable[[Node], float] | None = None) -> float:
        """Request latency when nodes take `duration(node)`."""
        fin = self.finish_times(duration)
        return max(fin, default=0.0) + self.tail_s

    def critical_path(self, duration: Callable[[Node], float] | None = None) -> list[int]:
        """Indices of the nodes on the critical path, first to last."""
        fin = self.finish_times(duration)
        if not fin:
            return []
        i = max(range(len(fin)), key=fin.__getitem__)
        path = [i]
        while self.nodes[i].deps:
            i = max(self.nodes[i].deps, key=fin.__getitem__)
            path.append(i)
        return path[::-1]


def from_sample(request: str, seq: list[Any], call_duration: Callable[[Call], float]) -> RequestGraph:
    """The graph of one sampled request (see workload.sampler); calls take `call_duration(call)`."""
    nodes: list[Node] = []

    def walk(items: list[Any], deps: tuple[int, ...]) -> tuple[int, ...]:
        for item in items:
            if isinstance(item, Call):
                nodes.append(Node(CALL, item.llm, item.role, item.prompt_tokens, item.output_tokens,
                                  call_duration(item), deps))
                deps = (len(nodes) - 1,)
            elif isinstance(item, Tool):
                nodes.append(Node(TOOL, item.name, None, 0, 0, item.latency_s, deps))
                deps = (len(nodes) - 1,)
            else:
                ends: list[int] = []
                for lane in item:
                    ends.extend(walk(lane, deps))
                deps = tuple(ends)
        return deps

    walk(seq, ())
    g = RequestGraph(request, tuple(nodes))
    return RequestGraph(request, g.nodes, 0.0, True, g.latency())


def from_trace(trace: Trace) -> list[RequestGraph]:
    """One graph per traced request (calls without a request id are left out)."""
    calls: dict[str, list[CallRecord]] = {}
    for c in trace.calls:
        if c.request is not None:
            calls.setdefault(c.request, []).append(c)
    tools: dict[str, list[SpanRecord]] = {}
    spans: dict[str, SpanRecord] = {}
    for s in trace.spans:
        if s.span == "request":
            spans[s.request] = s
        elif s.span == "tool":
            tools.setdefault(s.request, []).append(s)
    out = []
    for rid in trace.requests():
        out.append(_infer(rid, calls.get(rid, []), tools.get(rid, []), spans.get(rid)))
    return out


def _cached(c: CallRecord) -> int:
    """What a warm prefix cache reuses of a traced call's prompt: the longer of its shares with the request's
    earlier calls and with other requests (the gateway's `prefix_tokens`, `system_tokens`), in whole blocks,
    at most prompt − 1 (vLLM's rule); 0 for a trace without them."""
    shared = max(c.prefix_tokens or 0, c.system_tokens or 0)
    return min(shared // BLOCK_TOKENS * BLOCK_TOKENS, max_hit_tokens(c.prompt_tokens or 0))


def _infer(rid: str, calls: Sequence[CallRecord], tools: Sequence[SpanRecord], span: SpanRecord | None) -> RequestGraph:
    items: list[tuple[float, float, Node]] = []
    for c in calls:
        items.append((c.t_start, c.t_end, Node(CALL, c.llm, c.role, c.prompt_tokens or 0,
                                                c.completion_tokens or 0, c.duration_s, (),
                                                cached_tokens=_cached(c))))
    for t in tools:
        items.append((t.t_start, t.t_end, Node(TOOL, t.name or "tool", None, 0, 0, t.t_end - t.t_start, ())))
    items.sort(key=lambda x: (x[0], x[1]))
    t0 = span.t_start if span is not None else min((s for s, _, _ in items), default=0.0)
    t_end = span.t_end if span is not None else max((e for _, e, _ in items), default=t0)
    nodes: list[Node] = []
    ends: list[float] = []
    for start, end, n in items:
        pred, best = -1, -1.0
        for j, e in enumerate(ends):
            if e <= start + EPS_S and e > best:
                pred, best = j, e
        if pred < 0:
            nodes.append(_with(n, (), max(start - t0, 0.0)))
        else:
            nodes.append(_with(n, (pred,), max(start - best, 0.0)))
        ends.append(end)
    ok = (span is None or span.status == "ok") and all(c.status == "ok" for c in calls)
    g = RequestGraph(rid, tuple(nodes), 0.0, ok, t_end - t0)
    last = max(g.finish_times(), default=0.0)
    return RequestGraph(rid, g.nodes, max(t_end - t0 - last, 0.0), ok, t_end - t0)


def _with(n: Node, deps: tuple[int, ...], gap: float) -> Node:
    return Node(n.kind, n.name, n.role, n.prompt_tokens, n.output_tokens, n.duration_s, deps, gap, n.cached_tokens)


def iter_call_nodes(graphs: Iterable[RequestGraph]) -> Iterable[Node]:
    """Every call node of the graphs."""
    for g in graphs:
        for n in g.nodes:
            if n.kind == CALL:
                yield n
