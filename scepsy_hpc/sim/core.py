"""The discrete-event simulator: workflow requests × gateway routing × continuous-batching engines.

Routing (the gateway's policy): a call goes to the replica of its LLM with the fewest outstanding
calls (lowest index on ties). A replica holding `max_num_seqs` calls is full; when every replica
is full the gateway holds the call in one FIFO per LLM and hands it to the first replica that frees
a slot — a shared queue, so c replicas behave as one c-server station rather than c separate queues.

Event loop: a heap of (time, priority, sequence number). At equal timestamps events run in this
order, and within a class in the order they were scheduled:
    PRIO_ARRIVAL (0)  a new workflow request arrives
    PRIO_TOOL    (1)  a tool wait ends
    PRIO_ENGINE  (2)  an engine iteration (or run of decode iterations) ends
so new work that appears at the instant an iteration ends is seen by that boundary's scheduling
step, as a real scheduler sees every request that reached it before it runs.

Determinism: arrivals and request programs are drawn from two RNG streams derived from the seed
and consumed in arrival order, so the same seed gives the same workload whatever the plan, and the
same result bit for bit.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

from scepsy_hpc.errors import InfeasibleError
from scepsy_hpc.perf.model import EngineConfig, EnginePerf
from scepsy_hpc.sim.engine import SimEngine, Seq
from scepsy_hpc.spec.catalog import GPUSpec, ModelSpec
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import Workflow, resolve_model
from scepsy_hpc.workload.arrivals import poisson_arrivals
from scepsy_hpc.workload.sampler import Call, RequestSampler, Tool

PRIO_ARRIVAL, PRIO_TOOL, PRIO_ENGINE = 0, 1, 2
MIN_KV_TOKENS = 256


class EventLoop:
    """A heap of timed callbacks `fn(t, arg)`, ordered by (time, priority, insertion order)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Callable[[float, Any], None], Any]] = []
        self._n = 0
        self.now = 0.0
        self.events = 0

    def at(self, t: float, priority: int, fn: Callable[[float, Any], None], arg: Any = None) -> None:
        """Run `fn(t, arg)` at time `t`."""
        self._n += 1
        heapq.heappush(self._heap, (t, priority, self._n, fn, arg))

    def run(self, horizon: float = math.inf) -> None:
        """Process events in order until none is left or the next is after `horizon`."""
        heap, pop = self._heap, heapq.heappop
        n = 0
        while heap:
            if heap[0][0] > horizon:
                break
            t, _, _, fn, arg = pop(heap)
            self.now = t
            fn(t, arg)
            n += 1
        self.events += n


@dataclass(frozen=True)
class CallRecord:
    """One simulated LLM call (kept when `record_calls=True`)."""

    request: int
    llm: str
    role: str | None
    replica: int
    prompt_tokens: int
    output_tokens: int
    t_submit: float
    t_admit: float
    t_first: float
    t_end: float


@dataclass(frozen=True)
class RequestRecord:
    """One workflow request: arrival, end (−1 if unfinished), LLM calls and times it finished (1)."""

    id: int
    t_arrive: float
    t_end: float
    llm_calls: int
    finishes: int


@dataclass(frozen=True)
class LLMStats:
    """Per-LLM figures of a simulation. `utilisation` is the share of time an instance runs at
    least one call (averaged over replicas), not a share of its batch capacity."""

    calls: int
    calls_per_request: float
    latency_mean_s: float
    ttft_mean_s: float
    queue_mean_s: float
    utilisation: float
    replicas: int
    tp: int
    gpu_frac: float
    kv_capacity_tokens: int
    truncated_calls: int


@dataclass(frozen=True)
class SimResult:
    """What a simulation measured. Latency figures exclude the first `warmup_frac` of requests."""

    workflow: str
    rate_rps: float
    requests: int
    completed: int
    throughput_rps: float
    latency_mean_s: float
    latency_p50_s: float
    latency_p90_s: float
    latency_p99_s: float
    llm_calls: int
    calls_per_request: float
    sim_time_s: float
    wall_s: float
    events: int
    seed: int
    warmup_frac: float
    per_llm: dict[str, LLMStats]
    request_records: tuple[RequestRecord, ...] = field(default=(), repr=False)
    call_records: tuple[CallRecord, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (records left out)."""
        d = asdict(self)
        d.pop("request_records")
        d.pop("call_records")
        d["llm_calls_per_wall_s"] = self.llm_calls / self.wall_s if self.wall_s > 0 else None
        return d


class _Root:
    __slots__ = ("sim", "id", "t_arrive", "t_end", "calls", "finishes")

    def __init__(self, sim: "_Sim", rid: int, t: float) -> None:
        self.sim, self.id, self.t_arrive = sim, rid, t
        self.t_end = -1.0
        self.calls = 0
        self.finishes = 0

    def resume(self, t: float, _: Any) -> None:
        self.finishes += 1
        self.t_end = t
        self.sim.completed += 1


class _Lane:
    """A sequence being executed: runs its items one after another."""

    __slots__ = ("sim", "items", "i", "parent", "root")

    def __init__(self, sim: "_Sim", items: list[Any], parent: Any, root: _Root) -> None:
        self.sim, self.items, self.i, self.parent, self.root = sim, items, 0, parent, root

    def run(self, t: float) -> None:
        items = self.items
        if self.i >= len(items):
            self.parent.resume(t, None)
            return
        item = items[self.i]
        cls = type(item)
        if cls is Call:
            self.sim.call(item, t, self)
        elif cls is Tool:
            self.sim.loop.at(t + item.latency_s, PRIO_TOOL, self.resume)
        else:
            group = _Group(len(item), self)
            for lane in item:
                _Lane(self.sim, lane, group, self.root).run(t)

    def resume(self, t: float, _: Any) -> None:
        self.i += 1
        self.run(t)


class _Group:
    """A parallel group: resumes its parent when every lane has finished."""

    __slots__ = ("remaining", "parent")

    def __init__(self, n: int, parent: _Lane) -> None:
        self.remaining, self.parent = n, parent

    def resume(self, t: float, _: Any) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.parent.resume(t, None)


class _Sim:
    def __init__(self, engines: dict[str, list[SimEngine]], record_calls: bool) -> None:
        self.loop = engines and next(iter(engines.values()))[0].loop
        self.engines = engines
        self.completed = 0
        self.record_calls = record_calls
        self.calls: list[CallRecord] = []
        self.stats: dict[str, list[float]] = {llm: [0, 0.0, 0.0, 0.0, 0] for llm in engines}
        self.rr: dict[str, int] = {}

    def _route(self, llm: str, replicas: list[SimEngine]) -> SimEngine:
        return _route_least_outstanding(self, llm, replicas)

    def call(self, call: Call, t: float, lane: _Lane) -> None:
        replicas = self.engines[call.llm]
        engine = replicas[0] if len(replicas) == 1 else self._route(call.llm, replicas)
        prompt, output, cut = engine.clamp(call.prompt_tokens, call.output_tokens)
        root = lane.root
        root.calls += 1
        stats = self.stats[call.llm]
        if cut:
            stats[4] += 1

        def done(t_end: float, s: Seq) -> None:
            stats[0] += 1
            stats[1] += t_end - s.t_submit
            stats[2] += s.t_first - s.t_submit
            stats[3] += s.t_admit - s.t_submit
            if self.record_calls:
                self.calls.append(CallRecord(root.id, s.llm, s.role, replicas.index(engine), s.prompt, s.output,
                                             s.t_submit, s.t_admit, s.t_first, t_end))
            lane.resume(t_end, None)

        seq = Seq(call.llm, call.role, prompt, output, t, done)
        if engine.outstanding >= engine.max_seqs:
            engine.backlog.append(seq)  # every replica is full: the gateway holds the call (FIFO)
        else:
            engine.submit(seq, t)


def _route_least_outstanding(sim: "_Sim", llm: str, replicas: list[SimEngine]) -> SimEngine:
    """Least outstanding calls; ties go round-robin, as the gateway breaks them (always taking the
    first would pile short calls on replica 0 whenever all are idle)."""
    n = len(replicas)
    start = sim.rr.get(llm, 0)
    best, best_k = None, 1 << 60
    for j in range(n):
        e = replicas[(start + j) % n]
        if e.outstanding < best_k:
            best, best_k = e, e.outstanding
    sim.rr[llm] = (replicas.index(best) + 1) % n
    return best


def engine_config(alloc: LLMAlloc, model: ModelSpec, gpu: GPUSpec) -> EngineConfig:
    """The engine configuration an allocation entry describes."""
    kw: dict[str, Any] = {}
    if alloc.max_num_seqs is not None:
        kw["max_num_seqs"] = alloc.max_num_seqs
    if alloc.max_batched_tokens is not None:
        kw["max_batched_tokens"] = alloc.max_batched_tokens
    return EngineConfig(model, gpu, tp=alloc.tp, gpu_frac=alloc.gpu_frac, **kw)


def simulate(
    wf: Workflow,
    allocation: Mapping[str, LLMAlloc],
    gpu: GPUSpec,
    models: Mapping[str, ModelSpec],
    *,
    rate_rps: float | None = None,
    n_requests: int = 200,
    seed: int = 0,
    arrivals: Sequence[float] | None = None,
    warmup_frac: float = 0.1,
    horizon_s: float = math.inf,
    record_calls: bool = False,
) -> SimResult:
    """Simulate `n_requests` Poisson arrivals at `rate_rps` (or the given `arrivals`) of workflow `wf`
    served with `allocation` on GPUs of type `gpu`."""
    if arrivals is None:
        if rate_rps is None or rate_rps <= 0:
            raise ValueError("give rate_rps > 0 or an arrivals list")
        arrivals = poisson_arrivals(rate_rps, n_requests, random.Random(f"{seed}/arrivals"))
    else:
        arrivals = sorted(arrivals)
        rate_rps = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 and arrivals[-1] > arrivals[0] else 0.0
    missing = [llm for llm in wf.llms if llm not in allocation]
    if missing:
        raise InfeasibleError(f"the plan allocates nothing to LLM(s) {', '.join(missing)} of workflow {wf.name!r}; add them under allocation:")
    loop = EventLoop()
    engines: dict[str, list[SimEngine]] = {}
    for llm in wf.llms:
        alloc = allocation[llm]
        perf = EnginePerf(engine_config(alloc, resolve_model(wf, llm, models), gpu))
        perf.check_fits(MIN_KV_TOKENS, label=f"LLM {llm!r}")
        engines[llm] = [SimEngine(loop, perf, f"{llm}/{r}", PRIO_ENGINE) for r in range(alloc.replicas)]
        backlog: deque[Seq] = deque()
        for engine in engines[llm]:
            engine.backlog = backlog
    sim = _Sim(engines, record_calls)
    sampler = RequestSampler(wf)
    program_rng = random.Random(f"{seed}/programs")
    roots: list[_Root] = []

    def arrive(t: float, i: int) -> None:
        root = _Root(sim, i, t)
        roots.append(root)
        _Lane(sim, sampler.sample(program_rng), root, root).run(t)
        if i + 1 < len(arrivals):
            loop.at(arrivals[i + 1], PRIO_ARRIVAL, arrive, i + 1)

    started = time.perf_counter()
    if arrivals:
        loop.at(arrivals[0], PRIO_ARRIVAL, arrive, 0)
    loop.run(horizon_s)
    wall = time.perf_counter() - started
    return _result(wf, sim, roots, engines, allocation, rate_rps or 0.0, seed, warmup_frac, wall, loop.events)


def _percentile(sorted_xs: list[float], q: float) -> float:
    if not sorted_xs:
        return math.nan
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _departure_rate(done: list[_Root]) -> float:
    ends = sorted(r.t_end for r in done)
    if len(ends) >= 2 and ends[-1] > ends[0]:
        return (len(ends) - 1) / (ends[-1] - ends[0])
    return 0.0


def _result(wf: Workflow, sim: _Sim, roots: list[_Root], engines: dict[str, list[SimEngine]],
            allocation: Mapping[str, LLMAlloc], rate: float, seed: int, warmup_frac: float,
            wall: float, events: int) -> SimResult:
    done = [r for r in roots if r.t_end >= 0]
    skip = int(len(roots) * warmup_frac)
    lat = sorted(r.t_end - r.t_arrive for r in roots[skip:] if r.t_end >= 0)
    # Throughput = departures per second in a window inside the loaded period: it opens one median
    # latency after the first measured arrival (the pipeline has filled), but no later than halfway
    # to the last arrival, and closes at the last arrival (after it the system drains). Departures
    # = arrivals − growth of requests in flight, so this reads about the arrival rate when the plan
    # keeps up and the service capacity when it does not. Tiny runs fall back to the departure
    # rate between the first and the last completion.
    w1 = roots[-1].t_arrive if roots else 0.0
    first = roots[skip].t_arrive if skip < len(roots) else 0.0
    w0 = first + min(_percentile(lat, 0.5) if lat else 0.0, 0.5 * max(w1 - first, 0.0))
    in_window = sum(1 for r in done if w0 <= r.t_end <= w1)
    t0 = roots[0].t_arrive if roots else 0.0
    t_last = max((r.t_end for r in done), default=t0)
    span = t_last - t0
    n_req = len(roots)
    per_llm: dict[str, LLMStats] = {}
    for llm, reps in engines.items():
        calls, s_lat, s_ttft, s_queue, cut = sim.stats[llm]
        calls = int(calls)
        util = sum(e.busy_s + (sim.loop.now - e._busy_since if e.mode != 0 else 0.0) for e in reps) / (len(reps) * span) if span > 0 else 0.0
        a = allocation[llm]
        per_llm[llm] = LLMStats(
            calls=calls,
            calls_per_request=calls / len(done) if done else 0.0,
            latency_mean_s=s_lat / calls if calls else math.nan,
            ttft_mean_s=s_ttft / calls if calls else math.nan,
            queue_mean_s=s_queue / calls if calls else math.nan,
            utilisation=util,
            replicas=a.replicas, tp=a.tp, gpu_frac=a.gpu_frac,
            kv_capacity_tokens=reps[0].kv_cap,
            truncated_calls=int(cut),
        )
    total_calls = sum(s.calls for s in per_llm.values())
    return SimResult(
        workflow=wf.name,
        rate_rps=rate,
        requests=n_req,
        completed=len(done),
        throughput_rps=in_window / (w1 - w0) if w1 > w0 and in_window >= 20 else _departure_rate(done),
        latency_mean_s=sum(lat) / len(lat) if lat else math.nan,
        latency_p50_s=_percentile(lat, 0.50),
        latency_p90_s=_percentile(lat, 0.90),
        latency_p99_s=_percentile(lat, 0.99),
        llm_calls=total_calls,
        calls_per_request=total_calls / len(done) if done else 0.0,
        sim_time_s=span,
        wall_s=wall,
        events=events,
        seed=seed,
        warmup_frac=warmup_frac,
        per_llm=per_llm,
        request_records=tuple(RequestRecord(r.id, r.t_arrive, r.t_end, r.calls, r.finishes) for r in roots),
        call_records=tuple(sim.calls),
    )

