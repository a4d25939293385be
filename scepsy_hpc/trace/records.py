"""Trace records and the JSONL trace file.

A trace file has one JSON object per line, each with a `kind`:

  {"kind": "meta", "version": 1, "workflow": "deep_research", "time_scale": 0.05, "source": "gateway", ...}
  {"kind": "call", "request": "r-000001", "llm": "planner", "role": "plan", "t_start": 12.1,
   "t_first": 12.4, "t_end": 15.0, "prompt_tokens": 1500, "completion_tokens": 250, "status": "ok", ...}
  (a call may also carry "prefix_tokens" and "system_tokens": see CallRecord)
  {"kind": "span", "span": "request" | "tool", "request": "r-000001", "name": "web_search",
   "t_start": 11.9, "t_end": 16.2, "status": "ok"}

Times are seconds of *model time* on one clock per file: a component running at time scale s
(engines pace s× real time) records (wall − t0) / s, so traces taken at any scale compare.
`meta` is optional and comes first when present; a request without a `request` span spans its calls.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

from scepsy_hpc.errors import SpecError

TRACE_VERSION = 1
STATUSES = ("ok", "error")


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One LLM call as the gateway saw it (t_first is None when not streamed or failed before a token)."""

    request: str | None
    llm: str
    t_start: float
    t_end: float
    t_first: float | None = None
    role: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: str = "ok"
    error: str | None = None
    http_status: int | None = None
    replica: str | None = None
    model: str | None = None
    stream: bool = False
    call_id: str | None = None
    # Leading prompt tokens shared with an earlier call of the same request to the same LLM (its prompt,
    # or its prompt + answer), and with other requests' calls (a common system prompt): the gateway's
    # estimate, in whole 16-token blocks, scaled to the engine's prompt_tokens (gateway/prefix.py).
    # None: not measured (older traces, calls without a request id for prefix_tokens).
    prefix_tokens: int | None = None
    system_tokens: int | None = None

    @property
    def duration_s(self) -> float:
        """End minus start."""
        return self.t_end - self.t_start


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """A request's whole span (span="request") or one tool wait inside it (span="tool")."""

    span: str
    request: str
    t_start: float
    t_end: float
    name: str | None = None
    status: str = "ok"
    error: str | None = None


@dataclass(frozen=True)
class Trace:
    """A trace file's content."""

    meta: dict[str, Any] = field(default_factory=dict)
    calls: tuple[CallRecord, ...] = ()
    spans: tuple[SpanRecord, ...] = ()

    def requests(self) -> list[str]:
        """Request ids in order of first appearance (calls without a request id are left out)."""
        seen: dict[str, None] = {}
        for s in self.spans:
            seen.setdefault(s.request, None)
        for c in self.calls:
            if c.request is not None:
                seen.setdefault(c.request, None)
        return list(seen)


_CALL_FIELDS = {f.name: f for f in fields(CallRecord)}
_SPAN_FIELDS = {f.name: f for f in fields(SpanRecord)}
_CALL_NAMES = tuple(_CALL_FIELDS)
_SPAN_NAMES = tuple(_SPAN_FIELDS)


def _record_dict(rec: CallRecord | SpanRecord) -> dict[str, Any]:
    # A shallow read of the fields (the records hold only scalars): `asdict` deep-copies, and the gateway
    # writes one record per call.
    names = _CALL_NAMES if isinstance(rec, CallRecord) else _SPAN_NAMES
    d: dict[str, Any] = {"kind": "call" if isinstance(rec, CallRecord) else "span"}
    for k in names:
        v = getattr(rec, k)
        if v is not None and not (k == "stream" and v is False):
            d[k] = v
    return d


def dumps_record(rec: CallRecord | SpanRecord | dict[str, Any]) -> str:
    """One JSONL line (no newline)."""
    d = rec if isinstance(rec, dict) else _record_dict(rec)
    return json.dumps(d, separators=(",", ":"), allow_nan=False)


_REQUIRED = {"call": ("llm", "t_start", "t_end"), "span": ("span", "request", "t_start", "t_end")}


def _parse_line(obj: Any, where: str) -> CallRecord | SpanRecord | dict[str, Any]:
    if not isinstance(obj, dict):
        raise SpecError(f"{where}: a trace line must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind == "meta":
        return obj
    if kind not in ("call", "span"):
        raise SpecError(f"{where}: unknown record kind {kind!r}; expected 'meta', 'call' or 'span'")
    known = _CALL_FIELDS if kind == "call" else _SPAN_FIELDS
    missing = [k for k in _REQUIRED[kind] if obj.get(k) is None]
    if missing:
        raise SpecError(f"{where}: {kind} record lacks {', '.join(missing)}")
    unknown = sorted(set(obj) - set(known) - {"kind"})
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)} in a {kind} record; "
                        f"known: {', '.join(sorted(known))}")
    args = {k: v for k, v in obj.items() if k != "kind"}
    for k in ("t_start", "t_end", "t_first"):
        if args.get(k) is not None and not isinstance(args[k], (int, float)):
            raise SpecError(f"{where}: {k} must be a number of seconds, got {args[k]!r}")
    if args.get("status", "ok") not in STATUSES:
        raise SpecError(f"{where}: status {args['status']!r} is not one of {', '.join(STATUSES)}")
    if args["t_end"] < args["t_start"]:
        raise SpecError(f"{where}: t_end {args['t_end']} is before t_start {args['t_start']}")
    if kind == "call":
        args.setdefault("request", None)  # a call outside any workflow request
    return (CallRecord if kind == "call" else SpanRecord)(**args)


def iter_trace_lines(lines: Iterable[str], name: str) -> Iterator[CallRecord | SpanRecord | dict[str, Any]]:
    """Parse JSONL lines; blank lines are skipped, a bad line raises SpecError naming `name:line`."""
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        where = f"{name}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecError(f"{where}: not JSON ({e.msg} at column {e.colno}); each line of a trace is one JSON object") from None
        yield _parse_line(obj, where)


def read_trace(path: str | Path) -> Trace:
    """Load a JSONL trace file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"{p}: cannot read trace: {e.strerror}") from None
    meta: dict[str, Any] = {}
    calls: list[CallRecord] = []
    spans: list[SpanRecord] = []
    for rec in iter_trace_lines(text.splitlines(), str(p)):
        if isinstance(rec, dict):
            meta.update({k: v for k, v in rec.items() if k != "kind"})
        elif isinstance(rec, CallRecord):
            calls.append(rec)
        else:
            spans.append(rec)
    return Trace(meta, tuple(calls), tuple(spans))


def write_trace(path: str | Path, trace: Trace) -> None:
    """Write a whole trace (meta first)."""
    with open(path, "w") as f:
        if trace.meta:
            f.write(dumps_record({"kind": "meta", "version": TRACE_VERSION, **trace.meta}) + "\n")
        for rec in (*trace.spans, *trace.calls):
            f.write(dumps_record(rec) + "\n")


class TraceWriter:
    """Appends records to an open JSONL stream, one line each, flushed; safe across threads."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._lock = threading.Lock()
        self.count = 0

    def write(self, rec: CallRecord | SpanRecord | dict[str, Any]) -> None:
        """Append one record."""
        self.write_many((rec,))

    def write_many(self, recs: Sequence[CallRecord | SpanRecord | dict[str, Any]]) -> None:
        """Append records in one write and one flush (the gateway's trace thread writes a batch at a time)."""
        if not recs:
            return
        text = "".join(dumps_record(rec) + "\n" for rec in recs)
        with self._lock:
            self.stream.write(text)
            self.stream.flush()
            self.count += len(recs)
