"""A simulated continuous-batching engine instance (vLLM V1 scheduling, iteration level).

Each iteration runs one decode token for every decoding sequence plus prefill chunks of newly
admitted sequences, FCFS, within `max_batched_tokens` (chunked prefill). A waiting sequence is
admitted at an iteration boundary when fewer than `max_num_seqs` run and the KV cache can reserve
its prompt plus output tokens (no preemption: a full cache means queueing). A sequence's first
token comes at the end of the iteration that completes its prefill; each later iteration adds one.

Runs of decode-only iterations are advanced in one event with `DecodeSeries` (exact at iteration
granularity); an arrival during such a run cuts it at the end of the iteration in progress, which
is exactly when a real scheduler would see the new request.

Prefix caching (vLLM's automatic prefix caching): a `Seq` may carry the names of its prompt+answer
cache blocks (`perf.prefix.segment_blocks`). At admission it reuses the leading prompt blocks cached
at its engine (vLLM's rule: whole blocks, at most prompt − 1 tokens); those tokens are neither
prefilled (chunked prefill starts after them) nor reserved again (shared blocks). When its prefill
completes its prompt blocks are cached, pinned while it runs; when it ends its prompt+answer blocks
stay cached, unpinned. KV rule: the KV in use is `kv_used` (what running sequences reserve beyond
the cached blocks they pin) plus 16 × the pinned blocks, each counted once however many sequences
share it (a system prompt); a sequence is admitted when that, its new reservation (prompt + output −
reused) and the free cached blocks it would pin fit the KV capacity. Unpinned cached blocks live in
the space left and are evicted LRU when a reservation needs the room, so they never block an
admission. A seq without blocks behaves exactly as before; an engine that never sees one has no
cache at all.

`EnginePool` puts the replicas of one deployment behind the gateway's routing and queue.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

from scepsy_hpc.perf.events import EventLoop
from scepsy_hpc.perf.model import EnginePerf, chunk_prefills
from scepsy_hpc.perf.prefix import (BLOCK_TOKENS, DEFAULT_AFFINITY_RATIO, DEFAULT_AFFINITY_SLACK, PrefixCache, affine_ok,
                                    max_hit_tokens)
from scepsy_hpc.perf.prefix_runs import RunCache, Runs

IDLE, STEP, EPOCH, BOUNDARY = 0, 1, 2, 3


class Seq:
    """One call in flight at an engine."""

    __slots__ = ("llm", "role", "prompt", "output", "t_submit", "t_admit", "t_first", "t_end",
                 "prefilled", "start_iter", "kv", "done", "replica", "blocks", "cached")

    def __init__(self, llm: str, role: str | None, prompt: int, output: int, t_submit: float,
                 done: Callable[[float, "Seq"], None], blocks: Sequence[Hashable] | None = None) -> None:
        self.llm, self.role, self.prompt, self.output = llm, role, prompt, output
        self.t_submit = t_submit
        self.t_admit = self.t_first = self.t_end = -1.0
        self.prefilled = 0
        self.start_iter = 0
        self.kv = 0
        self.done = done
        self.replica = 0  # index of the replica its pool routed it to
        self.blocks = blocks  # names of its prompt+answer cache blocks (None: shares nothing)
        self.cached = 0  # prompt tokens reused from the prefix cache (not prefilled)


class SimEngine:
    """One engine instance; `submit` hands it a call, `Seq.done` is called when the call ends."""

    def __init__(self, loop: EventLoop, perf: EnginePerf, name: str, priority: int) -> None:
        self.loop, self.perf, self.name, self.priority = loop, perf, name, priority
        cfg = perf.cfg
        self.max_seqs = cfg.max_num_seqs
        self.budget = cfg.max_batched_tokens
        self.kv_cap = perf.kv_capacity_tokens
        self.waiting: deque[Seq] = deque()
        self.prefilling: list[Seq] = []
        self.decoding: list[tuple[int, int, Seq]] = []  # heap of (end iteration, tie, seq)
        self.n_dec = 0
        self.p_dec = 0  # Σ prompt tokens of decoding sequences
        self.s_start = 0  # Σ start_iter of decoding sequences: context = p_dec + n_dec·iter − s_start
        self.kv_used = 0
        self.iter = 0
        self.mode = IDLE
        self.version = 0
        self.outstanding = 0
        self._tie = 0
        self._pending_iters = 0
        self._step_prefill: list[Seq] = []
        self._ep_t0 = 0.0
        self._ep_series: Any = None
        self._ep_k = 0
        self.backlog: deque[Seq] | None = None  # the deployment's gateway queue, shared by its replicas
        self.busy_s = 0.0
        self._busy_since = 0.0
        self.iterations = 0
        self.peak_running = 0
        self.pcache: PrefixCache | RunCache | None = None  # made when the first seq with blocks arrives
        self.prompt_tokens = 0  # Σ prompt tokens admitted (vLLM's prefix_cache_queries)
        self.cached_tokens = 0  # of those, reused from the cache (vLLM's prefix_cache_hits)

    @property
    def prefix_evictions(self) -> int:
        """Blocks evicted from this engine's prefix cache."""
        return self.pcache.stats.evictions if self.pcache is not None else 0

    def _fit_cache(self, extra: int = 0) -> None:
        """Cache capacity = KV blocks no reservation holds (pinned ones included; + `extra` reserved blocks
        about to become pinned cache); evicts unpinned blocks LRU beyond it."""
        self.pcache.resize((self.kv_cap - self.kv_used) // BLOCK_TOKENS + extra)

    def clamp(self, prompt: int, output: int) -> tuple[int, int, bool]:
        """Fit a request into the KV cache (vLLM rejects or truncates what exceeds max_model_len)."""
        cap = min(self.kv_cap, self.perf.cfg.model.max_model_len)
        if prompt + output <= cap:
            return prompt, output, False
        prompt = min(prompt, cap - 1)
        return prompt, max(1, cap - prompt), True

    def submit(self, seq: Seq, now: float) -> None:
        """A call arrives at this engine at `now`."""
        self.outstanding += 1
        self.waiting.append(seq)
        if self.mode == IDLE:
            self._busy_since = now
            self._plan(now)
        elif self.mode == EPOCH:
            self._cut(now)

    def _cut(self, now: float) -> None:
        """End the decode run at the first iteration boundary at or after `now`."""
        series, elapsed = self._ep_series, now - self._ep_t0
        j = min(series.count_within(elapsed), self._ep_k)
        if j < self._ep_k and series.total(j) < elapsed:
            j += 1  # the iteration in progress finishes first
        self._pending_iters = j
        self.mode = STEP
        self.version += 1
        self.loop.at(self._ep_t0 + series.total(j), self.priority, self._boundary, self.version)

    def _boundary(self, t: float, version: int) -> None:
        if version != self.version:
            return  # superseded by a cut
        self.iter += self._pending_iters
        self.iterations += self._pending_iters
        finished: list[Seq] = []
        pc = self.pcache
        for s in self._step_prefill:
            s.t_first = t
            if s.blocks is not None:  # its prompt's blocks are computed: cached, pinned while it runs
                new = s.blocks[s.cached // BLOCK_TOKENS:s.prompt // BLOCK_TOKENS]
                self._fit_cache(len(new))
                moved = pc.insert(new) * BLOCK_TOKENS   # reserved tokens that are pinned cache from now on
                s.kv -= moved
                self.kv_used -= moved
            if s.output <= 1:
                finished.append(s)
            else:
                s.start_iter = self.iter - 1
                self._tie += 1
                heapq.heappush(self.decoding, (self.iter + s.output - 1, self._tie, s))
                self.n_dec += 1
                self.p_dec += s.prompt
                self.s_start += s.start_iter
        self._step_prefill = []
        dec = self.decoding
        while dec and dec[0][0] <= self.iter:
            s = heapq.heappop(dec)[2]
            self.n_dec -= 1
            self.p_dec -= s.prompt
            self.s_start -= s.start_iter
            finished.append(s)
        self.mode = BOUNDARY
        for s in finished:
            self.kv_used -= s.kv
            self.outstanding -= 1
            s.t_end = t
            if s.blocks is not None:  # its prompt+answer blocks stay cached, unpinned
                n_prompt = s.prompt // BLOCK_TOKENS
                out = s.blocks[n_prompt:(s.prompt + s.output) // BLOCK_TOKENS]
                self._fit_cache()   # its reservation (the answer's tokens among it) is free again
                pc.insert(out)
                pc.release(s.blocks[:n_prompt + len(out)][::-1])  # tail first: evicted before the head, as vLLM frees
        if pc is not None and finished:
            self._fit_cache()
        backlog = self.backlog
        while backlog and self.outstanding < self.max_seqs:
            self.outstanding += 1  # a call held at the gateway takes the freed slot first
            self.waiting.append(backlog.popleft())
        for s in finished:
            s.done(t, s)  # may submit new calls here; they wait for _plan below
        self._plan(t)

    def _plan(self, t: float) -> None:
        """Admit waiting sequences and start the next iteration (or run of iterations) at `t`."""
        waiting, prefilling = self.waiting, self.prefilling
        pc = self.pcache
        while waiting and len(prefilling) + self.n_dec < self.max_seqs:
            s = waiting[0]
            need = s.prompt + s.output
            if s.blocks is not None:
                if pc is None:  # this replica's first call with blocks
                    kind = RunCache if isinstance(s.blocks, Runs) else PrefixCache
                    pc = self.pcache = kind(self.kv_cap // BLOCK_TOKENS)
                hit = pc.lookup(s.blocks, s.prompt)
                in_use = self.kv_used + pc.pinned * BLOCK_TOKENS
                if in_use + need - hit + pc.unpinned(s.blocks[:hit // BLOCK_TOKENS]) * BLOCK_TOKENS > self.kv_cap:
                    break  # FCFS, as below: even with its reused blocks it does not fit
                s.cached = s.prefilled = pc.acquire(s.blocks, s.prompt, hit)  # reused: not prefilled, not reserved
                need -= s.cached
                self.cached_tokens += s.cached
            elif self.kv_used + need + (pc.pinned * BLOCK_TOKENS if pc is not None else 0) > self.kv_cap:
                break  # FCFS: the head waits for KV space, and so does everyone behind it
            elif s.cached:   # warm history (EnginePool.submit's warm_tokens): reused, but its own KV
                s.prefilled = s.cached
                self.cached_tokens += s.cached
            waiting.popleft()
            self.kv_used += need
            self.prompt_tokens += s.prompt
            s.kv = need
            s.t_admit = t
            prefilling.append(s)
            if pc is not None:
                self._fit_cache()  # the reservation takes room from unpinned cached blocks
        running = len(prefilling) + self.n_dec
        if running > self.peak_running:
            self.peak_running = running
        ctx = self.p_dec + self.n_dec * self.iter - self.s_start
        if prefilling:
            chunks, done_now = chunk_prefills(prefilling, self.budget - self.n_dec)
            if done_now:
                self.prefilling = [s for s in prefilling if s.prefilled < s.prompt]
            self._step_prefill = done_now
            self._pending_iters = 1
            self.mode = STEP
            self.version += 1
            self.loop.at(t + self.perf.iteration_time(self.n_dec, ctx, chunks), self.priority, self._boundary, self.version)
        elif self.n_dec:
            k = self.decoding[0][0] - self.iter
            series = self.perf.decode_series(self.n_dec, ctx)
            self._ep_t0, self._ep_series, self._ep_k = t, series, k
            self._pending_iters = k
            self.mode = EPOCH
            self.version += 1
            self.loop.at(t + series.total(k), self.priority, self._boundary, self.version)
        else:
            self.mode = IDLE
            self.busy_s += t - self._busy_since


@dataclass(frozen=True)
class CallRecord:
    """One simulated LLM call (kept when records are asked for)."""

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
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache: prefill computed = prompt − this


class EnginePool:
    """The replicas of one deployment behind the gateway (its policy): a call goes to the replica
    with the fewest outstanding calls, ties round-robin. A replica holding `max_num_seqs` calls is
    full; when every replica is full the call waits in one FIFO they share and goes to the first
    replica that frees a slot, so c replicas behave as one c-server station, not c queues.

    Unlike replicas (a mixed group) carry `weights` (calls/s each carries at capacity): a call goes to
    the replica with a free slot whose (outstanding + 1) / weight is least, so under load each holds
    calls in proportion to its weight; with equal weights this is the rule above.

    Prefix affinity (`prefix_affinity`, the gateway's rule, `perf.prefix.affine_ok`): a call with cache
    blocks goes to the replica whose cache holds the longest leading run of them (among equals the least
    loaded) while that replica has a free slot and its load (outstanding + 1, per unit of weight) is at
    most the least loaded free replica's plus `affinity_slack` calls, or `affinity_ratio` times it;
    otherwise, or when no replica holds any, as above."""

    def __init__(self, replicas: list[SimEngine], *, prefix_affinity: bool = True,
                 affinity_slack: int = DEFAULT_AFFINITY_SLACK, affinity_ratio: float = DEFAULT_AFFINITY_RATIO,
                 weights: Sequence[float] | None = None) -> None:
        if not (affinity_slack >= 0 and affinity_ratio >= 0):   # also refuses NaN
            raise ValueError(f"affinity_slack={affinity_slack}, affinity_ratio={affinity_ratio}: both must be >= 0 "
                             "(calls, and times, a prefix's replica may carry over the least loaded one)")
        self.replicas = replicas
        self.prefix_affinity = prefix_affinity
        self.affinity_slack = affinity_slack
        self.affinity_ratio = affinity_ratio
        if weights is not None and (len(weights) != len(replicas) or not all(w > 0 for w in weights)):
            raise ValueError(f"weights {list(weights)} must be one positive number per replica ({len(replicas)})")
        # equal weights route exactly as none (the unweighted rule, bit for bit)
        self.weights = list(weights) if weights is not None and len(set(weights)) > 1 else None
        # the longest call every replica takes uncut (`fits`)
        self._fit_tokens = min(min(e.kv_cap, e.perf.cfg.model.max_model_len) for e in replicas) if replicas else 0
        self._rr = 0
        backlog: deque[Seq] = deque()
        for engine in replicas:
            engine.backlog = backlog

    def fits(self, prompt: int, output: int) -> bool:
        """Whether a call fits its engines uncut (a cut call shares nothing: its cache blocks need no names).
        With unlike replicas: every one of them."""
        return prompt + output <= self._fit_tokens

    def _route(self) -> int:
        """Least outstanding calls; ties go round-robin, as the gateway breaks them (always taking the
        first would pile short calls on replica 0 whenever all are idle)."""
        replicas = self.replicas
        n = len(replicas)
        if n == 1:
            return 0
        if self.weights is not None:
            return self._route_weighted()
        start = self._rr
        best, best_k = 0, 1 << 60
        for j in range(n):
            i = (start + j) % n
            if replicas[i].outstanding < best_k:
                best, best_k = i, replicas[i].outstanding
        self._rr = (best + 1) % n
        return best

    def _load(self, i: int) -> float:
        """Replica i's normalised load if it took one more call."""
        return (self.replicas[i].outstanding + 1) / self.weights[i]  # type: ignore[index]

    def _route_weighted(self) -> int:
        """Least normalised load among replicas with a free slot (ties round-robin); when all are full,
        the least normalised load (the call then waits in the shared FIFO)."""
        replicas = self.replicas
        n = len(replicas)
        start = self._rr
        best, best_k, best_full = 0, math.inf, True
        for j in range(n):
            i = (start + j) % n
            full = replicas[i].outstanding >= replicas[i].max_seqs
            k = self._load(i)
            if (best_full and not full) or (full == best_full and k < best_k):
                best, best_k, best_full = i, k, full
        self._rr = (best + 1) % n
        return best

    def _route_prefix(self, blocks: Sequence[Hashable], prompt: int) -> int:
        """The replica holding the longest cached leading run of `blocks` (among equals the least loaded,
        ties round-robin), when it has a free slot and `affine_ok` against the least loaded free replica;
        else `_route`."""
        replicas = self.replicas
        n = len(replicas)
        hits = [0] * n
        top = 0
        for i, e in enumerate(replicas):
            if e.pcache is not None:
                h = hits[i] = e.pcache.lookup(blocks, prompt)
                if h > top:
                    top = h
        if top == 0:
            return self._route()
        w = self.weights
        start = self._rr
        best, best_load = -1, math.inf
        least_load, least_w = math.inf, 1.0
        for j in range(n):
            i = (start + j) % n
            e = replicas[i]
            if e.outstanding >= e.max_seqs:
                continue
            load = (e.outstanding + 1) / w[i] if w is not None else e.outstanding + 1
            if load < least_load:
                least_load, least_w = load, (w[i] if w is not None else 1.0)
            if hits[i] == top and load < best_load:
                best, best_load = i, load
        if best < 0 or not affine_ok(best_load, least_load, least_w, self.affinity_slack, self.affinity_ratio):
            return self._route()
        self._rr = (best + 1) % n
        return best

    def submit(self, llm: str, role: str | None, prompt_tokens: int, output_tokens: int, t: float,
               done: Callable[[float, Seq], None], blocks: Sequence[Hashable] | None = None,
               warm_tokens: int = 0) -> bool:
        """Route one call arriving at `t`; `done(t_end, seq)` when it ends (`seq.replica` says where).
        `blocks` names its prompt+answer cache blocks (`perf.prefix.segment_blocks`; None: shares
        nothing, no prefix cache). `warm_tokens` (a call without blocks): that many leading prompt
        tokens are its own history, found cached (whole blocks, at most prompt − 1): not prefilled,
        but held in the KV cache like the rest of its prompt — the warm case profiles replay, at the
        cost of a call without cache bookkeeping. True when the call was cut to fit the KV cache (a
        cut call shares nothing)."""
        if blocks is not None and self.prefix_affinity and len(self.replicas) > 1:
            i = self._route_prefix(blocks, prompt_tokens)
        else:
            i = self._route()
        engine = self.replicas[i]
        prompt, output, cut = engine.clamp(prompt_tokens, output_tokens)
        seq = Seq(llm, role, prompt, output, t, done, None if cut else blocks)
        if warm_tokens and blocks is None and not cut:
            seq.cached = min(warm_tokens // BLOCK_TOKENS * BLOCK_TOKENS, max_hit_tokens(prompt))
        seq.replica = i
        if engine.outstanding >= engine.max_seqs:
            engine.backlog.append(seq)  # every replica is full: the gateway holds the call (FIFO)
        else:
            engine.submit(seq, t)
        return cut
