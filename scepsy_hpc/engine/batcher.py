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

`step(now)` returns the iteration starting at `now` with its effects already applied (they take
hold at `now + duration_s`); the driver sleeps until then and delivers the tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from scepsy_hpc.perf.model import EnginePerf, chunk_prefills

WAITING, PREFILL, DECODE, DONE, ABORTED = "waiting", "prefill", "decode", "done", "aborted"


class SimRequest:
    """One request in the engine; times are model seconds, −1 until they happen."""

    __slots__ = ("rid", "prompt", "output", "t_arrive", "t_admit", "t_first", "t_end", "prefilled",
                 "generated", "state")

    def __init__(self, rid: int, prompt: int, output: int, t_arrive: float) -> None:
        self.rid, self.prompt, self.output, self.t_arrive = rid, prompt, output, t_arrive
        self.t_admit = self.t_first = self.t_end = -1.0
        self.prefilled = 0
        self.generated = 0
        self.state = WAITING

    @property
    def kv_tokens(self) -> int:
        """KV tokens reserved at admission (prompt plus every output token; ignore_eos)."""
        return self.prompt + self.output

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

    def __init__(self, perf: EnginePerf) -> None:
        self.perf = perf
        self.max_seqs = perf.cfg.max_num_seqs
        self.budget = perf.cfg.max_batched_tokens
        self.kv_cap = perf.kv_capacity_tokens
        self.waiting: deque[SimRequest] = deque()
        self.prefilling: list[SimRequest] = []  # admitted, prompt not fully prefilled, admission order
        self.decoding: list[SimRequest] = []
        self.kv_used = 0
        self._ids: dict[int, SimRequest] = {}

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

    def submit(self, rid: int, prompt: int, output: int, t_arrive: float) -> SimRequest:
        """Queue a request of `prompt` tokens that will produce exactly `output` tokens."""
        if prompt < 1 or output < 1:
            raise ValueError(f"request {rid}: prompt ({prompt}) and output ({output}) tokens must be >= 1")
        if prompt + output > self.kv_cap:
            # It could never be admitted and would block the FCFS queue forever.
            raise ValueError(f"request {rid}: {prompt + output} tokens exceed the KV cache of {self.kv_cap} tokens")
        if rid in self._ids:
            raise ValueError(f"request id {rid} is already in the engine")
        req = SimRequest(rid, prompt, output, t_arrive)
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
            self.kv_used -= req.kv_tokens
        elif req.state == DECODE:
            self.decoding.remove(req)
            self.kv_used -= req.kv_tokens
        req.state = ABORTED
        return True

    def _admit(self, now: float) -> None:
        waiting = self.waiting
        while waiting and waiting[0].t_arrive <= now and self.num_running < self.max_seqs:
            req = waiting[0]
            if self.kv_used + req.kv_tokens > self.kv_cap:
                break  # FCFS: the head waits for KV space, and so does everyone behind it
            waiting.popleft()
            self.kv_used += req.kv_tokens
            req.t_admit = now
            req.state = PREFILL
            self.prefilling.append(req)

    def step(self, now: float) -> Iteration | None:
        """Admit what can be admitted at `now` and run one iteration; None if there is nothing to run."""
        self._admit(now)
        if not (self.prefilling or self.decoding):
            return None
        decoding = self.decoding
        ctx = sum(r.prompt + r.generated for r in decoding)  # each decoder attends to its whole context
        chunks, prefilled = chunk_prefills(self.prefilling, self.budget - len(decoding))
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
            self.kv_used -= req.kv_tokens
            del self._ids[req.rid]
        return Iteration(now, dt, tuple(emitted), tuple(finished))
