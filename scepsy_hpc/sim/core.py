"""The discrete-event simulator: workflow requests × gateway routing × continuous-batching engines.

Routing (the gateway's policy, `perf.engine.EnginePool`): a call goes to the replica of its LLM
with the fewest outstanding calls (round-robin on ties). A replica holding `max_num_seqs` calls is
full; when every replica is full the gateway holds the call in one FIFO per LLM and hands it to the
first replica that frees a slot — a shared queue, so c replicas behave as one c-server station
rather than c separate queues. A call that continues a conversation or shares a system prompt carries
its cache blocks (`perf.prefix.segment_blocks`): the engine reuses what its prefix cache holds, and
routing prefers the replica holding the prefix (prefix affinity).

Event loop (`perf.events.EventLoop`): a heap of (time, priority, sequence number). At equal
timestamps events run in this order, and within a class in the order they were scheduled:
    PRIO_ARRIVAL (0)  a new workflow request arrives
    PRIO_TOOL    (1)  a tool wait ends
    PRIO_ENGINE  (2)  an engine iteration (or run of decode iterations) ends
so new work that appears at the instant an iteration ends is seen by that boundary's scheduling
step, as a real scheduler sees every request that reached it before it runs.

Request cap (`max_requests`, off by default): a gateway that lets at most N workflow requests be in
flight; a request arriving when N are holds at the gateway (FIFO, its program already drawn) and
starts when one ends. Its latency counts from its arrival. Past capacity, conversations that continue
on a prefix cache otherwise multiply until their histories no longer fit and every call prefills its
whole history again, which lowers the capacity further (a collapse that feeds itself); a cap near the
requests in flight at capacity (Little's law: capacity × latency there) keeps the deployment at its
capacity instead. The gateway applies the same cap (`gateway/admission.py`, `scepsy up --max-requests`).

Determinism: arrivals and request programs are drawn from two RNG streams derived from the seed
and consumed in arrival order, so the same seed gives the same workload whatever the plan, and the
same result bit for bit.
"""

from __future__ import annotations

import heapq
import math
import os
import random
import signal
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

from scepsy_hpc.errors import InfeasibleError
from scepsy_hpc.perf.engine import CallRecord, EnginePool, Seq, SimEngine
from scepsy_hpc.perf.events import PRIO_ARRIVAL, PRIO_ENGINE, PRIO_TOOL, EventLoop
from scepsy_hpc.perf.fit import check_fit, engine_config, replica_weights
from scepsy_hpc.perf.prefix import DEFAULT_AFFINITY_RATIO, DEFAULT_AFFINITY_SLACK
from scepsy_hpc.perf.prefix_runs import segment_runs
from scepsy_hpc.spec.catalog import GPUSpec, ModelSpec
from scepsy_hpc.spec.plan import Entry, groups_of
from scepsy_hpc.spec.workflow import Workflow, resolve_model
from scepsy_hpc.workload.arrivals import poisson_arrivals
from scepsy_hpc.workload.sampler import Call, RequestSampler, Tool

@dataclass(frozen=True)
class RequestRecord:
    """One workflow request: arrival, end (−1 if unfinished), LLM calls, times it finished (1), and when it
    started (its arrival, or later when it held at the request cap; −1: not recorded)."""

    id: int
    t_arrive: float
    t_end: float
    llm_calls: int
    finishes: int
    t_start: float = -1.0


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
    prefix_cache_queries: int = 0  # prompt tokens admitted (vLLM's vllm:prefix_cache_queries_total)
    prefix_cache_hits: int = 0  # of those, reused from the prefix cache (vllm:prefix_cache_hits_total)
    prefix_hit_rate: float = 0.0  # hits / queries
    prefix_cache_evictions: int = 0  # cached blocks evicted for room
    prefill_tokens: int = 0  # prompt tokens prefilled (computed): queries − hits
    groups: str = ""  # a mixed group's configurations, e.g. "2×tp=4 + 3×gpu_frac=0.5" ("" for one configuration)


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
    max_requests: int | None = None  # the request cap (None: none)
    held_requests: int = 0  # measured requests that waited at the cap
    held_mean_s: float = 0.0  # their mean wait there, over every measured request (part of the latency)
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
    __slots__ = ("sim", "id", "t_arrive", "t_start", "t_end", "calls", "finishes")

    def __init__(self, sim: "_Sim", rid: int, t: float) -> None:
        self.sim, self.id, self.t_arrive = sim, rid, t
        self.t_start = t  # later when it held at the request cap
        self.t_end = -1.0
        self.calls = 0
        self.finishes = 0

    def resume(self, t: float, _: Any) -> None:
        self.finishes += 1
        self.t_end = t
        sim = self.sim
        sim.completed += 1
        if self.finishes == 1:
            sim.in_flight -= 1
            if sim.held:   # the request cap: the longest-held request takes the slot
                sim.held.popleft()(t)


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
    def __init__(self, pools: dict[str, EnginePool], record_calls: bool) -> None:
        self.loop = pools and next(iter(pools.values())).replicas[0].loop
        self.pools = pools
        self.completed = 0
        self.in_flight = 0  # requests started and not ended
        self.held: deque[Callable[[float], None]] = deque()  # requests holding at the request cap, FIFO
        self.record_calls = record_calls
        self.calls: list[CallRecord] = []
        self.stats: dict[str, list[float]] = {llm: [0, 0.0, 0.0, 0.0, 0] for llm in pools}

    def call(self, call: Call, t: float, lane: _Lane) -> None:
        root = lane.root
        root.calls += 1
        stats = self.stats[call.llm]

        def done(t_end: float, s: Seq) -> None:
            stats[0] += 1
            stats[1] += t_end - s.t_submit
            stats[2] += s.t_first - s.t_submit
            stats[3] += s.t_admit - s.t_submit
            if self.record_calls:
                self.calls.append(CallRecord(root.id, s.llm, s.role, s.replica, s.prompt, s.output,
                                             s.t_submit, s.t_admit, s.t_first, t_end, s.cached))
            lane.resume(t_end, None)

        seg, pool = call.segments, self.pools[call.llm]
        blocks = segment_runs(seg + ((call.output_segment, call.output_tokens),)) \
            if seg and pool.fits(call.prompt_tokens, call.output_tokens) else None
        if pool.submit(call.llm, call.role, call.prompt_tokens, call.output_tokens, t, done, blocks):
            stats[4] += 1


def simulate(
    wf: Workflow,
    allocation: Mapping[str, Entry],
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
    prefix_affinity: bool = True,
    affinity_slack: int = DEFAULT_AFFINITY_SLACK,
    affinity_ratio: float = DEFAULT_AFFINITY_RATIO,
    max_requests: int | None = None,
) -> SimResult:
    """Simulate `n_requests` Poisson arrivals at `rate_rps` (or the given `arrivals`) of workflow `wf`
    served with `allocation` on GPUs of type `gpu`. Calls that continue a conversation or share a
    system prompt reuse the engines' prefix caches; `prefix_affinity` routes them to the replica
    holding their prefix (`perf.engine.EnginePool`) within `affinity_slack` calls or `affinity_ratio` × the
    least loaded replica's load (`perf.prefix.affine_ok`). `max_requests`: at most that many requests in
    flight, later ones hold at the gateway (FIFO) until one ends (None: no cap)."""
    _check_cap(max_requests)
    if arrivals is None:
        if rate_rps is None or rate_rps <= 0:
            raise ValueError("give rate_rps > 0 or an arrivals list")
        arrivals = poisson_arrivals(rate_rps, n_requests, random.Random(f"{seed}/arrivals"))
    else:
        arrivals = sorted(arrivals)
        rate_rps = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 and arrivals[-1] > arrivals[0] else 0.0
    run = _Run(wf, allocation, gpu, models, arrivals, seed, prefix_affinity, affinity_slack, affinity_ratio, max_requests,
               record_calls)
    started = time.perf_counter()
    run.start()
    run.loop.run(horizon_s)
    return run.result(rate_rps or 0.0, warmup_frac, time.perf_counter() - started)


def _check_cap(max_requests: int | None) -> None:
    if max_requests is not None and (isinstance(max_requests, bool) or not isinstance(max_requests, int)
                                     or max_requests < 1):
        raise ValueError(f"max_requests={max_requests!r}: a whole number of requests of at least 1, or None for no cap")


class _Run:
    """One simulation's state: engines, pools, the event loop, and the requests arriving at `arrivals`
    (a list that may grow while the run goes on: `GrowingRun`)."""

    def __init__(self, wf: Workflow, allocation: Mapping[str, Entry], gpu: GPUSpec, models: Mapping[str, ModelSpec],
                 arrivals: list[float], seed: int, prefix_affinity: bool, affinity_slack: int, affinity_ratio: float,
                 max_requests: int | None, record_calls: bool = False) -> None:
        missing = [llm for llm in wf.llms if llm not in allocation]
        if missing:
            raise InfeasibleError(f"the plan allocates nothing to LLM(s) {', '.join(missing)} of workflow {wf.name!r}; add them under allocation:")
        self.wf, self.allocation, self.seed, self.max_requests = wf, allocation, seed, max_requests
        self.arrivals = arrivals
        self.loop = loop = EventLoop()
        self.engines: dict[str, list[SimEngine]] = {}
        engines = self.engines
        pools: dict[str, EnginePool] = {}
        for llm in wf.llms:
            model = resolve_model(wf, llm, models)
            reps: list[SimEngine] = []
            for alloc in groups_of(allocation[llm]):
                perf = check_fit(engine_config(alloc, model, gpu), label=f"LLM {llm!r}")
                reps += [SimEngine(loop, perf, f"{llm}/{len(reps) + r}", PRIO_ENGINE) for r in range(alloc.replicas)]
            engines[llm] = reps
            # unlike replicas of a mixed group share calls by capacity weight; like ones evenly (weights None)
            weights = replica_weights(allocation[llm], model, gpu) if len(groups_of(allocation[llm])) > 1 else None
            pools[llm] = EnginePool(reps, prefix_affinity=prefix_affinity, affinity_slack=affinity_slack,
                                    affinity_ratio=affinity_ratio, weights=weights)
        self.sim = sim = _Sim(pools, record_calls)
        self.roots: list[_Root] = []
        sampler = RequestSampler(wf)
        program_rng = random.Random(f"{seed}/programs")
        roots = self.roots

        def arrive(t: float, i: int) -> None:
            root = _Root(sim, i, t)
            roots.append(root)
            program = sampler.sample(program_rng)   # drawn at arrival, held or not: the same workload either way

            def start(t_start: float) -> None:
                root.t_start = t_start
                sim.in_flight += 1
                _Lane(sim, program, root, root).run(t_start)

            if max_requests is not None and sim.in_flight >= max_requests:
                sim.held.append(start)
            else:
                start(t)
            if i + 1 < len(arrivals):
                loop.at(arrivals[i + 1], PRIO_ARRIVAL, arrive, i + 1)
        self.arrive = arrive

    def start(self) -> None:
        if self.arrivals:
            self.loop.at(self.arrivals[0], PRIO_ARRIVAL, self.arrive, 0)

    def result(self, rate: float, warmup_frac: float, wall: float) -> "SimResult":
        return _result(self.wf, self.sim, self.roots, self.engines, self.allocation, rate, self.seed, warmup_frac, wall,
                       self.loop.events, self.max_requests)


class GrowingRun:
    """`simulate(…, n_requests=n)` for a growing `n` (what `sim.capacity.judge` asks for when it
    lengthens a run), each result the one a fresh `simulate` gives, bit for bit, at the cost of
    simulating the longest run once plus each shorter run's drain.

    Why it is exact: arrivals and programs are drawn in arrival order from seeded streams, so the
    first n requests of a longer run are the n requests of the shorter one, and until the (n+1)-th
    arrives both runs process the same events in the same order (the next arrival, scheduled but not
    reached, orders nothing else). So the run goes on up to just before arrival n + 1; a forked copy of
    the process drops that arrival, drains the n requests in flight and sends back the result; the
    run itself goes on from there for the next, longer call. Where a fork is not to be had (no
    `os.fork`, or other threads in the process, Python's or native ones such as a BLAS pool: a forked
    copy of a threaded process can deadlock; a pool's worker process has none) or a copy fails, after a
    run stopped mid-event, and for an `n` not above the last one, the run is simulated afresh: the same
    result."""

    def __init__(self, wf: Workflow, allocation: Mapping[str, Entry], gpu: GPUSpec, models: Mapping[str, ModelSpec],
                 *, rate_rps: float, seed: int = 0, warmup_frac: float = 0.1, prefix_affinity: bool = True,
                 affinity_slack: int = DEFAULT_AFFINITY_SLACK, affinity_ratio: float = DEFAULT_AFFINITY_RATIO,
                 max_requests: int | None = None, fork: bool = True) -> None:
        _check_cap(max_requests)
        if not rate_rps or rate_rps <= 0:
            raise ValueError("give rate_rps > 0")
        self._args = (wf, allocation, gpu, models)
        self._kw = dict(rate_rps=rate_rps, seed=seed, warmup_frac=warmup_frac, prefix_affinity=prefix_affinity,
                        affinity_slack=affinity_slack, affinity_ratio=affinity_ratio, max_requests=max_requests)
        self._rng = random.Random(f"{seed}/arrivals")   # poisson_arrivals' stream, drawn on as the run grows
        self._t = 0.0
        self._run = _Run(wf, allocation, gpu, models, [], seed, prefix_affinity, affinity_slack, affinity_ratio,
                         max_requests)
        self._at = 0          # requests the run has gone past (the next arrival is this one)
        self._started = False
        self._wall = 0.0      # wall seconds the run has spent so far
        self.forked = 0       # results drained in a forked copy (the others simulated afresh)
        self.fork = fork      # False: every length simulated afresh (to compare)

    def __call__(self, n: int) -> SimResult:
        if n < 1:
            raise ValueError(f"n={n}: at least one request")
        if n <= self._at or not self.fork or not _can_fork():
            return simulate(*self._args, n_requests=n, **self._kw)
        run, arrivals = self._run, self._run.arrivals
        rate = self._kw["rate_rps"]
        while len(arrivals) < n + 1:          # one past n: its arrival marks where the n-request run ends
            self._t += self._rng.expovariate(rate)
            arrivals.append(self._t)
        t0 = time.perf_counter()
        if not self._started:
            self._started = True
            run.start()
        try:
            run.loop.run_before(arrivals[n])
        except BaseException:
            self.fork = False   # stopped mid-event (Ctrl-C): its state is no whole run; later lengths afresh
            raise
        self._at = n
        self._wall += time.perf_counter() - t0
        res = _drained_copy(run, n, rate, self._kw["warmup_frac"], self._wall)
        if res is None:
            return simulate(*self._args, n_requests=n, **self._kw)
        self.forked += 1
        return res


def _can_fork() -> bool:
    """A fork is to be had and this process runs one thread: Python's (`threading`) and native ones (a
    solver's pool, counted by the kernel)."""
    import threading

    if not hasattr(os, "fork") or threading.active_count() != 1:
        return False
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1]) == 1
    except (OSError, ValueError):
        pass
    return True


def _drained_copy(run: _Run, n: int, rate: float, warmup_frac: float, wall: float) -> SimResult | None:
    """The result of `run` as if its arrivals ended at request `n` (the next event is arrival n): drained
    in a forked copy of this process, sent back pickled; None when the copy fails."""
    import pickle

    r, w = os.pipe()
    stops = {signal.SIGINT, signal.SIGTERM}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)   # none lands in the copy before its try
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(r)
        os.close(w)
        return None
    if pid == 0:   # the copy: drop arrival n, drain, send the result; never returns
        code = 1
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.close(r)
            t0 = time.perf_counter()
            heap = run.loop._heap
            if not heap or heap[0][3] is not run.arrive or heap[0][4] != n:
                os._exit(1)   # the next event is not the arrival that ends the run: simulated afresh instead
            heapq.heappop(heap)
            run.loop.run()
            data = pickle.dumps(run.result(rate, warmup_frac, wall + time.perf_counter() - t0),
                                protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(w, "wb") as f:
                f.write(data)
            code = 0
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(w)
    data, status = b"", 1
    try:
        with os.fdopen(r, "rb") as f:
            data = f.read()
    finally:
        if not data:   # interrupted (Ctrl-C) or failed: the copy is not waited for to finish its drain
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:   # SIGCHLD ignored here: the copy was reaped for us; its pickle says if it ended well
            status = 0
    if status != 0 or not data:
        return None
    try:
        res = pickle.loads(data)
    except Exception:   # noqa: BLE001 — a copy that sent no result: simulated afresh
        return None
    return res if isinstance(res, SimResult) else None


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
            allocation: Mapping[str, Entry], rate: float, seed: int, warmup_frac: float,
            wall: float, events: int, max_requests: int | None = None) -> SimResult:
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
        gs = groups_of(allocation[llm])
        a = gs[0]
        queries = sum(e.prompt_tokens for e in reps)
        hits = sum(e.cached_tokens for e in reps)
        per_llm[llm] = LLMStats(
            calls=calls,
            calls_per_request=calls / len(done) if done else 0.0,
            latency_mean_s=s_lat / calls if calls else math.nan,
            ttft_mean_s=s_ttft / calls if calls else math.nan,
            queue_mean_s=s_queue / calls if calls else math.nan,
            utilisation=util,
            replicas=len(reps), tp=a.tp, gpu_frac=a.gpu_frac,
            kv_capacity_tokens=reps[0].kv_cap,
            groups=" + ".join(f"{g.replicas}×{g.describe()}" for g in gs) if len(gs) > 1 else "",
            truncated_calls=int(cut),
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
            prefix_hit_rate=hits / queries if queries else 0.0,
            prefix_cache_evictions=sum(e.prefix_evictions for e in reps),
            prefill_tokens=queries - hits,
        )
    total_calls = sum(s.calls for s in per_llm.values())
    measured = roots[skip:]
    held = [r.t_start - r.t_arrive for r in measured if r.t_start > r.t_arrive]
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
        max_requests=max_requests,
        held_requests=len(held),
        held_mean_s=sum(held) / len(measured) if measured else 0.0,
        request_records=tuple(RequestRecord(r.id, r.t_arrive, r.t_end, r.calls, r.finishes, r.t_start)
                              for r in roots),
        call_records=tuple(sim.calls),
    )

