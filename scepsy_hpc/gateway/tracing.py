"""The gateway's side of tracing: the model-time clock, a writer thread, and request/tool span pairing."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

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
        while True:
            try:
                rec = self._pending.popleft()
            except IndexError:
                return
            try:
                self.writer.write(rec)
            except Exception:  # a full disk must not stop tracing of later calls silently
                log.exception("cannot write a trace record")

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


class SpanBook:
    """Pairs span start and end events; an end yields a SpanRecord.

    Starts are matched by (span, request, name, id): the optional `id` disambiguates concurrent
    tool calls of the same name; without it, ends are paired with starts first-in first-out.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[str, str, str | None, str | None], list[float]] = {}

    def open_count(self) -> int:
        """Spans started and not yet ended."""
        return sum(len(v) for v in self._open.values())

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
        key = (span, request, name, ident)
        if event == "start":
            if "status" in body or "error" in body:
                raise SpanError("status and error belong to the 'end' event")
            self._open.setdefault(key, []).append(now)
            return None
        status, error = body.get("status", "ok"), body.get("error")
        if status not in ("ok", "error"):
            raise SpanError(f"status must be 'ok' or 'error', got {status!r}")
        if error is not None and not isinstance(error, str):
            raise SpanError(f"error must be a string, got {error!r}")
        starts = self._open.get(key)
        if not starts:
            label = f"{span} span of request {request!r}" + (f" named {name!r}" if name else "") + (f" id {ident!r}" if ident else "")
            raise SpanError(f"end of a {label} that was never started; send event 'start' first")
        t_start = starts.pop(0)
        if not starts:
            del self._open[key]
        return SpanRecord(span=span, request=request, t_start=t_start, t_end=max(now, t_start), name=name,
                          status=status, error=error)
