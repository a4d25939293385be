"""The iteration scheduler of the simulated engine server: pure, no I/O, no clock of its own.

It makes the same decisions as `scepsy_hpc.perf.engine.SimEngine` (vLLM V1 scheduling), one
iteration at a time so that a real-time driver can hand out tokens as they are produced:

- FCFS waiting queue. At an iteration boundary `now`, the head of the queue (if it arrived by
  `now`) is admitted while fewer than `max_num_seqs` sequences run and the KV cache can reserve its
  prompt plus output tokens; otherwise it, and everyone behind it, waits (no preemption).
- An iteration runs one decode token for every decoding sequence plus prefill chunks of admitted
  sequences in admission order, within `max_batched_tokens` less the decode tokens (chunked prefill).
  Its duration is `EnginePerf.iteration_time(n_decode, ctx_decode, chunks)`.
- A sequence's first token comes at the end of the iteration that completes its prefill; each later
  iteration adds one; it finishes with its last output token and frees its KV reservation.

Automatic prefix caching (vLLM's, on by default; `prefix_caching=False` is --no-enable-prefix-caching): a
request may name the full 16-token blocks of its sequence (`blocks`: its prompt's, then those its output
fills, each name chaining the whole prefix, see `scepsy_hpc.perf.prefix`). At admission it acquires the
leading blocks a `PrefixCache` holds (at most prompt − 1 tokens, whole blocks): those tokens are not
prefilled (its prefill starts at `prefilled = hit`) and their KV is shared, so it reserves only
prompt − hit + output tokens. Blocks are cached as their tokens are computed (each prefill chunk's, then
each output block once its last token has gone through the model) and pinned while the request runs; when
it ends they stay cached as free blocks, evicted least recently used (a sequence's tail first, as vLLM
frees in reverse) whenever the space is needed: free cached blocks never hold up an admission.

KV accounting, in tokens: `kv_used` = 16 × (cached blocks pinned by running requests) + what running
requests reserve beyond the cached blocks they own. An admission needs `kv_used` + its reservation + 16 ×
(the free cached blocks its hit pins) <= the KV capacity; the cache may hold its pinned blocks plus
(capacity − kv_used) // 16 free ones, the same rule as vLLM's free-block queue.

`step(now)` returns the iteration starting at `now` with its effects already applied (they take
hold at `now + duration_s`); the driver sleeps until then and delivers the tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Hashable, Sequence

from scepsy_hpc.perf.model import EnginePerf, chunk_prefills
from scepsy_hpc.perf.prefix import BLOCK_TOKENS, PrefixCache

WAITING, PREFILL, DECODE, DONE, ABORTED = "waiting", "prefill", "decode", "done", "aborted"


class SimRequest:
    """One request in the engine; times are model seconds, −1 until they happen."""

    __slots__ = ("rid", "prompt", "output", "t_arrive", "t_admit", "t_first", "t_end", "prefilled",
                 "generated", "state", "blocks", "hit", "pins", "cached", "owned")

    def __init__(self, rid: int, prompt: int, output: int, t_arrive: float,
                 blocks: Sequence[Hashable] = ()) -> None:
        self.rid, self.prompt, self.output, self.t_arrive = rid, prompt, output, t_arrive
        self.t_admit = self.t_first = self.t_end = -1.0
        self.prefilled = 0
        self.generated = 0
        self.state = WAITING
        self.blocks = blocks          # names of its sequence's full blocks (prompt, then output)
        self.hit = 0                  # prompt tokens found cached at admission (not prefilled)
        self.pins: list[Hashable] = []   # cached blocks it pins, in sequence order
        self.cached = 0               # leading blocks of `blocks` pinned so far
        self.owned = 0                # of those, blocks it put in the cache (their KV is in its reservation)

    @property
    def kv_tokens(self) -> int:
        """KV tokens reserved at admission: prompt plus every output token (ignore_eos), less the cached hit."""
        return self.prompt - self.hit + self.output

    def __repr__(self) -> str:
        return f"SimRequest(rid={self.rid}, prompt={self.prompt}, output={self.output}, state={self.state})"


@dataclass(frozen=True)
class Iteration:
    """One engine iteration: when it starts, how long it takes, and what it produced at its end."""

    start_s: float
    duration_s: float
    # (request, its token count after this iteration) for each request that got a token; the
    # count is kept here because later steps advance `generated` before the driver delivers this one.
    emitted: tuple[tuple[SimRequest, int], ...]
    finished: tuple[SimRequest, ...]  # requests whose last token came in this iteration

    @property
    def end_s(self) -> float:
        """Model time at which the iteration's tokens exist."""
        return self.start_s + self.duration_s


class Batcher:
    """Continuous batching with chunked prefill over one `EnginePerf` (see the module docstring)."""

    def __init__(self, perf: EnginePerf, prefix_caching: bool = True) -> None:
        self.perf = perf
        self.max_seqs = perf.cfg.max_num_seqs
        self.budget = perf.cfg.max_batched_tokens
        self.kv_cap = perf.kv_capacity_tokens
        self.waiting: deque[SimRequest] = deque()
        self.prefilling: list[SimRequest] = []  # admitted, prompt not fully prefilled, admission order
        self.decoding: list[SimRequest] = []
        self._ids: dict[int, SimRequest] = {}
        # None: prefix caching off (nothing is looked up or counted)
        self.cache = PrefixCache(self.kv_cap // BLOCK_TOKENS) if prefix_caching else None
        self._reserved = 0                      # running requests' KV beyond the cached blocks they own
        self._pinned: dict[Hashable, int] = {}  # cached blocks running requests pin → how many pin it

    @property
    def kv_used(self) -> int:
        """KV tokens in use by running requests: their pinned cached blocks plus their other reservations."""
        return self._reserved + BLOCK_TOKENS * len(self._pinned)

    @property
    def num_running(self) -> int:
        """Admitted sequences (prefilling or decoding), as vLLM's num_requests_running counts them."""
        return len(self.prefilling) + len(self.decoding)

    @property
    def num_waiting(self) -> int:
        """Sequences queued for admission."""
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        """Share of the KV cache reserved, 0..1."""
        return self.kv_used / self.kv_cap if self.kv_cap else 0.0

    def idle(self) -> bool:
        """True when nothing runs or waits."""
        return not (self.waiting or self.prefilling or self.decoding)

    def submit(self, rid: int, prompt: int, output: int, t_arrive: float,
               blocks: Sequence[Hashable] = ()) -> SimRequest:
        """Queue a request of `prompt` tokens that will produce exactly `output` tokens; `blocks` names the
        full blocks of its sequence (prompt then output tokens, as many as known; empty: nothing to reuse
        or cache)."""
        if prompt < 1 or output < 1:
            raise ValueError(f"request {rid}: prompt ({prompt}) and output ({output}) tokens must be >= 1")
        if prompt + output > self.kv_cap:
            # It could never be admitted and would block the FCFS queue forever.
            raise ValueError(f"request {rid}: {prompt + output} tokens exceed the KV cache of {self.kv_cap} tokens")
        if rid in self._ids:
            raise ValueError(f"request id {rid} is already in the engine")
        req = SimRequest(rid, prompt, output, t_arrive, blocks)
        self._ids[rid] = req
        self.waiting.append(req)
        return req

    def abort(self, rid: int) -> bool:
        """Remove a request wherever it is and free its KV reservation; False if it is not in the engine."""
        req = self._ids.pop(rid, None)
        if req is None:
            return False
        if req.state == WAITING:
            self.waiting.remove(req)
        elif req.state == PREFILL:
            self.prefilling.remove(req)
            self._end(req)
        elif req.state == DECODE:
            self.decoding.remove(req)
            self._end(req)
        req.state = ABORTED
        return True

    def _admit(self, now: float) -> None:
        waiting, cache = self.waiting, self.cache
        while waiting and waiting[0].t_arrive <= now and self.num_running < self.max_seqs:
            req = waiting[0]
            hit = cache.lookup(req.blocks, req.prompt) if cache is not None and req.blocks else 0
            reuse = req.blocks[:hit // BLOCK_TOKENS]
            # free cached blocks it reuses come into use; other free ones are evicted to make room
            unpinned = sum(1 for b in reuse if b not in self._pinned)
            if self.kv_used + BLOCK_TOKENS * unpinned + req.prompt - hit + req.output > self.kv_cap:
                break  # FCFS: the head waits for KV space, and so does everyone behind it
            waiting.popleft()
            if cache is not None:
                hit = cache.acquire(req.blocks, req.prompt)   # counts vLLM's queries and hits
                self._pin(req, req.blocks[:hit // BLOCK_TOKENS])
            req.hit = req.prefilled = hit
            self._reserved += req.kv_tokens
            self._fit_cache()
            req.t_admit = now
            req.state = PREFILL
            self.prefilling.append(req)

    def _pin(self, req: SimRequest, blocks: Sequence[Hashable]) -> None:
        for b in blocks:
            self._pinned[b] = self._pinned.get(b, 0) + 1
        req.pins += blocks
        req.cached += len(blocks)

    def _fit_cache(self) -> None:
        """The cache holds its pinned blocks plus as many free ones as the unreserved KV space fits."""
        if self.cache is not None:
            self.cache.resize(len(self._pinned) + max(0, self.kv_cap - self.kv_used) // BLOCK_TOKENS)

    def _cache_computed(self, req: SimRequest, computed: int) -> None:
        """Cache (and pin) the blocks of `req` whose `computed` leading tokens now have their KV."""
        cache = self.cache
        n = min(len(req.blocks), computed // BLOCK_TOKENS)
        if cache is None or n <= req.cached:
            return
        new = req.blocks[req.cached:n]
        fresh = {b for b in new if b not in cache}   # its own KV, already inside its reservation
        cache.resize(cache.capacity + len(fresh))    # room without evicting anyone
        done = new[:cache.insert(new)]
        owned = sum(1 for b in done if b in fresh)
        self._pin(req, done)
        req.owned += owned
        self._reserved -= BLOCK_TOKENS * owned
        if len(done) < len(new):
            req.cached = len(req.blocks)   # the cache is full of pinned blocks: cache no more of it
        self._fit_cache()

    def _end(self, req: SimRequest) -> None:
        """Free what a finished or aborted request holds: its reservation and its pins (its blocks stay cached)."""
        self._reserved -= req.kv_tokens - BLOCK_TOKENS * req.owned
        if req.pins:
            assert self.cache is not None
            pinned = self._pinned
            for b in req.pins:
                if pinned[b] <= 1:
                    del pinned[b]
                else:
                    pinned[b] -= 1
            self.cache.release(req.pins[::-1])   # vLLM frees a sequence tail first: its tail is evicted first
            req.pins = []
        self._fit_cache()

    def step(self, now: float) -> Iteration | None:
        """Admit what can be admitted at `now` and run one iteration; None if there is nothing to run."""
        self._admit(now)
        if not (self.prefilling or self.decoding):
            return None
        decoding = self.decoding
        ctx = sum(r.prompt + r.generated for r in decoding)  # each decoder attends to its whole context
        chunks, prefilled = chunk_prefills(self.prefilling, self.budget - len(decoding))
        if self.cache is not None:
            for req in self.prefilling[:len(chunks)]:   # those that got a chunk: their computed blocks
                if req.blocks:
                    self._cache_computed(req, req.prefilled)
        if prefilled:
            self.prefilling = [r for r in self.prefilling if r.prefilled < r.prompt]
        dt = self.perf.iteration_time(len(decoding), ctx, chunks)
        end = now + dt
        emitted: list[tuple[SimRequest, int]] = []
        finished: list[SimRequest] = []
        still: list[SimRequest] = []
        for req in decoding:
            req.generated += 1
            emitted.append((req, req.generated))
            (finished if req.generated >= req.output else still).append(req)
            if len(req.blocks) > req.cached:   # the token before this one went through the model
                self._cache_computed(req, req.prompt + req.generated - 1)
        for req in prefilled:
            req.generated = 1
            req.t_first = end
            emitted.append((req, 1))
            if req.output <= 1:
                finished.append(req)
            else:
                req.state = DECODE
                still.append(req)
        self.decoding = still
        for req in finished:
            req.t_end = end
            req.state = DONE
            self._end(req)
            del self._ids[req.rid]
        return Iteration(now, dt, tuple(emitted), tuple(finished))
