"""The gateway's side of tracing: the model-time clock, a writer thread, and request/tool span pairing."""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable

from scepsy_hpc.errors import ScepsyError
from scepsy_hpc.trace.records import TRACE_VERSION, CallRecord, SpanRecord, TraceWriter

log = logging.getLogger("scepsy_hpc.gateway")


@dataclass(frozen=True)
class ModelClock:
    """Model seconds since the gateway started: (monotonic − t0) / time_scale."""

    time_scale: float = 1.0
    t0: float = field(default_factory=time.monotonic)

    def __call__(self) -> float:
        """Now, in model seconds."""
        return (time.monotonic() - self.t0) / self.time_scale


def meta_record(time_scale: float) -> dict[str, Any]:
    """The first line of a gateway trace."""
    return {"kind": "meta", "version": TRACE_VERSION, "source": "gateway", "time_scale": time_scale,
            "started": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}


_CALL_ID = re.compile(r'"call_id": ?"c-(\d+)"')


def open_trace(path: str | Path, *, append: bool = False) -> tuple[IO[str], int]:
    """Open a gateway trace file for writing (created 0600), and the number of its last call id (0: none).

    One trace per run: a file that already holds records is refused unless `append`, since a second
    run in it would number its calls from 1 again; with `append` the caller numbers on from the last."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        raise ScepsyError(f"{path}: cannot open the trace file: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)   # also an existing file (traces hold prompts' sizes, request ids, errors)
        size = os.fstat(fd).st_size
        if size and not append:
            raise ScepsyError(f"{path}: the trace file already holds {size} bytes of an earlier run; give a new file "
                              "(one trace per run, so call ids are unique in it), or move this one away")
    except BaseException:
        os.close(fd)
        raise
    last = 0
    if size:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                for m in _CALL_ID.finditer(line):
                    last = max(last, int(m.group(1)))
    return os.fdopen(fd, "a", encoding="utf-8"), last


class TraceSink:
    """Hands records to a TraceWriter on a thread, so a slow disk (NFS on clusters) never stalls the loop.

    The loop only appends to a deque. While records come, the thread writes what has gathered every
    `batch_s`, so a busy gateway does not pay a thread wake-up per call; when none are left it
    sleeps until the next `put` wakes it (an idle gateway costs no CPU).
    """

    def __init__(self, writer: TraceWriter | None, *, batch_s: float = 0.05) -> None:
        self.writer = writer
        self.batch_s = batch_s
        self._pending: deque[Any] = deque()
        self._wake = threading.Event()
        self._idle = False      # the thread sleeps until woken: the next put must wake it
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the writer thread (no-op without a writer)."""
        if self.writer is not None and self._thread is None:
            self._stopping = False
            self._wake.clear()
            self._thread = threading.Thread(target=self._run, name="scepsy-gateway-trace", daemon=True)
            self._thread.start()

    def put(self, rec: CallRecord | SpanRecord | dict[str, Any]) -> None:
        """Queue one record (never blocks)."""
        if self.writer is not None:
            self._pending.append(rec)  # deque.append is atomic: no lock shared with the thread
            if self._idle:
                self._wake.set()  # once per idle spell, not per record

    def _drain(self) -> None:
        assert self.writer is not None
        while self._pending:
            batch = []
            while len(batch) < 1024:   # one write and one flush per batch, not per call
                try:
                    batch.append(self._pending.popleft())
                except IndexError:
                    break
            try:
                self.writer.write_many(batch)
            except Exception:  # a full disk must not stop tracing of later calls silently
                log.exception("cannot write %d trace records", len(batch))

    def _run(self) -> None:
        while not self._stopping:
            if not self._pending:
                # Announce the sleep, then look again: a put that came before the flag is seen here,
                # one that comes after it sees the flag and wakes us.
                self._idle = True
                if not self._pending and not self._stopping:
                    self._wake.wait()
                self._idle = False
                self._wake.clear()
                continue
            self._drain()
            self._wake.clear()  # a wake-up from a put that saw `_idle` late must not end the next wait
            if not self._stopping:
                self._wake.wait(self.batch_s)  # let a batch gather; close() ends the wait at once
        self._drain()

    def close(self) -> None:
        """Write everything queued, then stop the thread (blocks until done)."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None
        elif self.writer is not None:
            self._drain()


class SpanError(ValueError):
    """A span event that cannot be paired or is malformed (the client gets a 400)."""


SPAN_KINDS = ("request", "tool")


# Bounds on what span events can make the gateway hold: open spans at once, their age, each string's length.
MAX_OPEN_SPANS = 10_000
MAX_SPAN_AGE_S = 3600.0
MAX_SPAN_FIELD_CHARS = 512

SpanKey = tuple[str, str, str | None, str | None]


class SpanBook:
    """Pairs span start and end events; an end yields a SpanRecord.

    Starts are matched by (span, request, name, id): the optional `id` disambiguates concurrent
    tool calls of the same name; without it, ends are paired with starts first-in first-out.

    Bounded: at most `max_open` starts wait for their end, none longer than `max_age_s` wall seconds
    (the oldest are dropped first and counted in `dropped`), and each string is at most
    `MAX_SPAN_FIELD_CHARS` long, so a client that never ends its spans cannot grow the gateway.
    """

    def __init__(self, *, max_open: int = MAX_OPEN_SPANS, max_age_s: float = MAX_SPAN_AGE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_open = max_open
        self.max_age_s = max_age_s
        self.clock = clock
        self.dropped = 0
        # per key, its open starts' sequence numbers, oldest first; and all open starts in order of arrival:
        # seq -> (key, model-time start, wall time of arrival)
        self._open: dict[SpanKey, deque[int]] = {}
        self._starts: OrderedDict[int, tuple[SpanKey, float, float]] = OrderedDict()
        self._seq = itertools.count()

    def open_count(self) -> int:
        """Spans started and not yet ended."""
        return len(self._starts)

    def _drop_oldest(self) -> None:
        seq, (key, _, _) = self._starts.popitem(last=False)
        seqs = self._open[key]
        seqs.popleft()   # per key, starts are in arrival order too: the oldest overall is its key's first
        if not seqs:
            del self._open[key]
        self.dropped += 1

    def prune(self) -> None:
        """Drop open starts past `max_age_s`, and the oldest past `max_open`."""
        oldest_ok = self.clock() - self.max_age_s
        while self._starts and (len(self._starts) > self.max_open
                                or next(iter(self._starts.values()))[2] < oldest_ok):
            self._drop_oldest()

    def event(self, body: Any, now: float) -> SpanRecord | None:
        """Apply one event from `POST /scepsy/v1/spans`; returns the record on `end`."""
        if not isinstance(body, dict):
            raise SpanError("a span event is a JSON object with keys span, event, request (and name, status, error, id)")
        unknown = sorted(set(body) - {"span", "event", "request", "name", "status", "error", "id"})
        if unknown:
            raise SpanError(f"unknown key(s) {', '.join(map(repr, unknown))} in a span event; "
                            "valid keys: error, event, id, name, request, span, status")
        span, event, request = body.get("span"), body.get("event"), body.get("request")
        name, ident = body.get("name"), body.get("id")
        if span not in SPAN_KINDS:
            raise SpanError(f"span must be 'request' or 'tool', got {span!r}")
        if event not in ("start", "end"):
            raise SpanError(f"event must be 'start' or 'end', got {event!r}")
        if not isinstance(request, str) or not request:
            raise SpanError(f"request must be a non-empty string (the workflow request id), got {request!r}")
        if name is not None and not isinstance(name, str):
            raise SpanError(f"name must be a string, got {name!r}")
        if ident is not None and not isinstance(ident, str):
            raise SpanError(f"id must be a string, got {ident!r}")
        for field_name in ("request", "name", "id", "error"):
            value = body.get(field_name)
            if isinstance(value, str) and len(value) > MAX_SPAN_FIELD_CHARS:
                raise SpanError(f"{field_name} is {len(value)} characters long; at most {MAX_SPAN_FIELD_CHARS}")
        key = (span, request, name, ident)
        self.prune()
        if event == "start":
            if "status" in body or "error" in body:
                raise SpanError("status and error belong to the 'end' event")
            seq = next(self._seq)
            self._starts[seq] = (key, now, self.clock())
            self._open.setdefault(key, deque()).append(seq)
            self.prune()
            return None
        status, error = body.get("status", "ok"), body.get("error")
        if status not in ("ok", "error"):
            raise SpanError(f"status must be 'ok' or 'error', got {status!r}")
        if error is not None and not isinstance(error, str):
            raise SpanError(f"error must be a string, got {error!r}")
        starts = self._open.get(key)
        if not starts:
            label = f"{span} span of request {request!r}" + (f" named {name!r}" if name else "") + (f" id {ident!r}" if ident else "")
            raise SpanError(f"end of a {label} that was never started (or started over {self.max_age_s:g} s ago, or "
                            f"beyond {self.max_open} open spans, and dropped); send event 'start' first")
        t_start = self._starts.pop(starts.popleft())[1]
        if not starts:
            del self._open[key]
        return SpanRecord(span=span, request=request, t_start=t_start, t_end=max(now, t_start), name=name,
                          status=status, error=error)


# Bounds on inferred tool spans: tool calls awaiting their result, requests remembered as posting their own.
MAX_PENDING_TOOLS = 10_000
MAX_EXPLICIT_REQUESTS = 10_000


class ToolBook:
    """Tool spans inferred from the calls themselves: a call whose answer asks for tools (`tool_calls`)
    opens one span per tool call id at its end; the request's first later call that carries a
    `role: "tool"` message with that `tool_call_id` closes it at its start. A result that never comes
    leaves no span.

    A request that posts its own tool spans to /scepsy/v1/spans gets no inferred ones (from its first
    such event on, its pending inferred spans are dropped), so a window is never counted twice.

    Bounded: at most `max_pending` tool calls wait for their result, none longer than `max_age_s` wall
    seconds (oldest dropped first, counted in `dropped`); a request's pending ones go when it ends.
    """

    def __init__(self, *, max_pending: int = MAX_PENDING_TOOLS, max_age_s: float = MAX_SPAN_AGE_S,
                 max_explicit: int = MAX_EXPLICIT_REQUESTS, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_pending = max_pending
        self.max_age_s = max_age_s
        self.max_explicit = max_explicit
        self.clock = clock
        self.dropped = 0
        self.pending = 0
        # per request, oldest first: tool call id -> (function name, model-time start, wall time opened)
        self._open: OrderedDict[str, dict[str, tuple[str, float, float]]] = OrderedDict()
        self._explicit: OrderedDict[str, None] = OrderedDict()

    def asked(self, request: str, calls: list[tuple[str, str]], t_end: float) -> None:
        """A call of `request` ended at `t_end` asking for these (tool call id, function name)s."""
        if not calls or request in self._explicit:
            return
        per = self._open.get(request)
        if per is None:
            per = self._open[request] = {}
        else:
            self._open.move_to_end(request)
        now = self.clock()
        for ident, name in calls:
            if ident not in per:
                self.pending += 1
            per[ident[:MAX_SPAN_FIELD_CHARS]] = (name[:MAX_SPAN_FIELD_CHARS], t_end, now)
        self._prune(now)

    def answered(self, request: str, messages: Any, t_start: float) -> list[SpanRecord]:
        """The spans a call of `request` starting at `t_start` closes (its `role: "tool"` messages)."""
        per = self._open.get(request)
        if not per or not isinstance(messages, list):
            return []
        out = []
        for m in messages:
            if isinstance(m, dict) and m.get("role") == "tool":
                hit = per.pop(str(m.get("tool_call_id")), None)
                if hit is not None:
                    self.pending -= 1
                    out.append(SpanRecord(span="tool", request=request, t_start=hit[1], t_end=max(t_start, hit[1]),
                                          name=hit[0] or None))
        if not per:
            del self._open[request]
        return out

    def explicit(self, request: str) -> None:
        """`request` posts its own tool spans: infer none for it from now on."""
        self.end_request(request)
        self._explicit[request] = None
        self._explicit.move_to_end(request)
        while len(self._explicit) > self.max_explicit:
            self._explicit.popitem(last=False)

    def end_request(self, request: str) -> None:
        """The request ended: its tool calls still waiting leave no span."""
        per = self._open.pop(request, None)
        if per:
            self.pending -= len(per)

    def _prune(self, now: float) -> None:
        oldest_ok = now - self.max_age_s
        while self._open and self.pending > self.max_pending:
            self._drop_first()
        while self._open:
            per = next(iter(self._open.values()))
            if min(v[2] for v in per.values()) >= oldest_ok:
                break
            self._drop_first()

    def _drop_first(self) -> None:
        _, per = self._open.popitem(last=False)
        self.pending -= len(per)
        self.dropped += len(per)
