"""A steady open-loop load of chat calls through an OpenAI-compatible URL, every call's outcome recorded.

What continuity benchmarks and tests run against the gateway while faults happen (a walltime
cut-over, an engine restart, a lost node): calls arrive at a fixed rate whatever the server does,
and each one ends as exactly one `CallRecord`, ok or failed with a reason. Nothing is dropped
silently: a call due while `max_in_flight` calls are outstanding is recorded as failed
("overload"), and a call cancelled by the load's own cancellation as failed ("cancelled").

A call is ok only if the HTTP status is 200 and, non-streamed, the JSON body has `choices`, or,
streamed, the stream ended with `data: [DONE]` and carried no error event. Failure reasons (the
keys of `summary()["failures"]`):
    overload      not sent: max_in_flight calls were outstanding
    http_<N>      the answer's status was N (not 200)
    no_choices    a 200 whose body is not JSON with a non-empty `choices` list
    truncated     the answer (stream or body) broke off: no [DONE], or the connection closed mid-body
    stream_error  the stream reached [DONE] but carried an error event (vLLM's mid-stream error)
    connect       no connection could be opened
    disconnected  the server closed the connection before answering
    timeout       no whole answer within timeout_s
    cancelled     the load was cancelled while the call was in flight
    exception     anything else the client raised (the detail names it)

Times are monotonic seconds since the load's start (`SteadyLoad.now()`), so a test can note when
it injected a fault and ask for the summary of the calls sent after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

OVERLOAD = "overload"
TRUNCATED = "truncated"
STREAM_ERROR = "stream_error"
NO_CHOICES = "no_choices"
CONNECT = "connect"
DISCONNECTED = "disconnected"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
EXCEPTION = "exception"
_DETAIL_CHARS = 300


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One call: when it was sent, first answered and ended (s since the load's start), and how it ended.

    `status` is the HTTP status (None: no answer); `error` the failure reason (None when ok), `detail`
    the failure in words. An overload record has t_send == t_end and no status.
    """

    model: str
    streamed: bool
    t_send: float
    t_first_byte: float | None
    t_end: float
    ok: bool
    status: int | None
    error: str | None
    detail: str = ""

    @property
    def latency_s(self) -> float:
        """Seconds from send to the end of the answer."""
        return self.t_end - self.t_send


@dataclass(frozen=True, slots=True)
class Gap:
    """The longest interval [start_s, end_s) in which no call of `model` succeeded."""

    model: str
    start_s: float
    end_s: float

    @property
    def length_s(self) -> float:
        """The gap's length in seconds."""
        return self.end_s - self.start_s


class SteadyLoad:
    """Chat calls to `{base_url}/chat/completions` at `rps`, round-robin over `models`, open loop.

    Arrivals are evenly spaced (call k at k/rps) or, with `poisson`, a Poisson process seeded by
    `seed`. In each round over the models a share `stream_share` of the rounds is streamed (spread
    evenly, so every model sees both kinds). `base_url` ends in /v1, like the openai SDK's; `headers`
    go with every call (e.g. the sim engine's `X-Sim-Fault` test hook), and `api_key` as `Authorization: Bearer`
    (the gateway's client key). Use `await run(duration_s)`,
    or `start()` ... `stop()`, or `async with SteadyLoad(...) as load:` (runs until the block ends);
    stopping sends no more calls and waits for the outstanding ones (each bounded by `timeout_s`).
    """

    def __init__(self, base_url: str, models: Sequence[str], rps: float, *, stream_share: float = 0.5,
                 max_tokens: int = 16, prompt_tokens: int = 16, timeout_s: float = 120.0, max_in_flight: int = 256,
                 seed: int = 0, poisson: bool = False, headers: dict[str, str] | None = None,
                 api_key: str | None = None) -> None:
        if not models:
            raise ValueError("models is empty; name at least one model to call")
        if not rps > 0 or math.isinf(rps):
            raise ValueError(f"rps must be a finite number > 0, got {rps}")
        if not 0.0 <= stream_share <= 1.0:
            raise ValueError(f"stream_share must be in [0, 1], got {stream_share}")
        if max_tokens < 1 or prompt_tokens < 1:
            raise ValueError(f"max_tokens and prompt_tokens must be >= 1, got {max_tokens} and {prompt_tokens}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.models = tuple(models)
        self.rps = float(rps)
        self.stream_share = float(stream_share)
        self.max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens
        self.timeout_s = float(timeout_s)
        self.max_in_flight = max_in_flight
        self.seed = seed
        self.poisson = poisson
        self.headers = {**dict(headers or {}), **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self._records: list[CallRecord] = []
        self._calls: set[asyncio.Task[None]] = set()
        self._arrivals: asyncio.Task[None] | None = None
        self._session: Any = None
        self._t0: float | None = None
        self._due = 0

    # --- state ------------------------------------------------------------------------------

    @property
    def records(self) -> list[CallRecord]:
        """The calls ended so far, in send order (a copy)."""
        return sorted(self._records, key=lambda r: r.t_send)

    @property
    def in_flight(self) -> int:
        """Calls sent and not yet ended."""
        return len(self._calls)

    @property
    def due(self) -> int:
        """Calls due so far (sent or refused as overload)."""
        return self._due

    def now(self) -> float:
        """Seconds since the load started (the clock of every record)."""
        if self._t0 is None:
            raise RuntimeError("the load has not started; call start() or run() first")
        return time.monotonic() - self._t0

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, duration_s: float | None = None) -> None:
        """Start sending in the background (for `duration_s` seconds, or until `stop()`)."""
        if self._arrivals is not None:
            raise RuntimeError("the load is already started; a SteadyLoad runs once")
        if duration_s is not None and not duration_s >= 0:
            raise ValueError(f"duration_s must be >= 0, got {duration_s}")
        import aiohttp

        # One connection per outstanding call at most, so no call waits in the client's pool.
        # Keep-alive stays on: the client's idle timeout (15 s) is below aiohttp servers' (75 s),
        # so the client closes an idle connection first and never reuses one the server dropped.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.max_in_flight),
                                              timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._t0 = time.monotonic()
        self._arrivals = asyncio.create_task(self._arrive(duration_s), name="steady-load-arrivals")

    async def stop(self) -> list[CallRecord]:
        """Send no more calls, wait for the outstanding ones, close the session; returns `records`.

        If stop() itself is cancelled, the outstanding calls are cancelled (each recorded as such).
        """
        arrivals = self._arrivals
        if arrivals is None or self._session is None:
            return self.records
        arrivals.cancel()  # a no-op once it has ended
        try:
            await asyncio.wait({arrivals})
            while self._calls:
                await asyncio.wait(set(self._calls))
        except asyncio.CancelledError:
            await self._abort()
            raise
        await self._close()
        if not arrivals.cancelled() and arrivals.exception() is not None:
            raise arrivals.exception()  # type: ignore[misc]  # a bug in the arrivals loop
        return self.records

    async def _abort(self) -> None:
        """Cancel the arrivals and every outstanding call (each records itself as cancelled), close the session."""
        if self._arrivals is not None:
            self._arrivals.cancel()
        for task in self._calls:
            task.cancel()
        await asyncio.gather(*[t for t in (self._arrivals, *self._calls) if t is not None], return_exceptions=True)
        await self._close()

    async def _close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def run(self, duration_s: float) -> list[CallRecord]:
        """Send calls for `duration_s` seconds, wait for all of them to end; returns `records`."""
        await self.start(duration_s)
        assert self._arrivals is not None
        try:
            await asyncio.wait({self._arrivals})
        except asyncio.CancelledError:
            await self._abort()
            raise
        return await self.stop()

    async def __aenter__(self) -> "SteadyLoad":
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            await self._abort()
        else:
            await self.stop()

    # --- arrivals and calls -------------------------------------------------------------------

    async def _arrive(self, duration_s: float | None) -> None:
        rng = random.Random(f"{self.seed}/steady-arrivals")
        k, t_due = 0, 0.0
        while duration_s is None or t_due < duration_s:
            delay = t_due - self.now()
            if delay > 0:
                await asyncio.sleep(delay)  # to an absolute time: scheduling delays do not lower the rate
            self._launch(k)
            k += 1
            t_due = t_due + rng.expovariate(self.rps) if self.poisson else k / self.rps

    def _launch(self, k: int) -> None:
        model = self.models[k % len(self.models)]
        rnd = k // len(self.models)
        streamed = math.floor((rnd + 1) * self.stream_share) > math.floor(rnd * self.stream_share)
        self._due += 1
        if len(self._calls) >= self.max_in_flight:
            t = self.now()
            self._records.append(CallRecord(model, streamed, t, None, t, False, None, OVERLOAD,
                                            f"{len(self._calls)} calls outstanding (max_in_flight={self.max_in_flight})"))
            return
        call = _Pending(model, streamed, self.now())
        task = asyncio.create_task(self._call(call))
        self._calls.add(task)
        task.add_done_callback(lambda t: self._ended(call, t))

    def _ended(self, call: "_Pending", task: asyncio.Task[None]) -> None:
        self._calls.discard(task)
        if call.recorded:
            return
        # A task cancelled before its first step never runs _call's body (a burst of arrivals on a busy
        # loop, then the load's cancellation): it still ends as exactly one record.
        detail = "the load was cancelled before the call was sent"
        if not task.cancelled():
            detail = f"the call ended without a record: {task.exception()!r}"
        self._records.append(CallRecord(call.model, call.streamed, call.t_due, None, self.now(), False, None,
                                        CANCELLED if task.cancelled() else EXCEPTION, detail[:_DETAIL_CHARS]))

    def _body(self, model: str, streamed: bool) -> dict[str, Any]:
        # The sim engine counts ceil(chars / 4) tokens plus 4 per message: about prompt_tokens in all.
        text = ("steady load " * self.prompt_tokens)[: 4 * max(1, self.prompt_tokens - 4)]
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}],
                                "max_tokens": self.max_tokens, "stream": streamed}
        return body

    async def _call(self, call: "_Pending") -> None:
        import aiohttp

        model, streamed = call.model, call.streamed
        t_send = self.now()
        t_first: float | None = None
        status: int | None = None

        def end(error: str | None, detail: str = "") -> None:
            call.recorded = True
            self._records.append(CallRecord(model, streamed, t_send, t_first, self.now(), error is None, status,
                                            error, detail[:_DETAIL_CHARS]))

        try:
            async with self._session.post(self.url, json=self._body(model, streamed), headers=self.headers) as resp:
                status = resp.status
                data = bytearray()
                stream = _SSE() if streamed and status == 200 else None
                async for chunk in resp.content.iter_any():
                    if t_first is None:
                        t_first = self.now()
                    if stream is not None:
                        stream.feed(chunk)
                    else:
                        data += chunk
            if status != 200:
                return end(f"http_{status}", bytes(data).decode("utf-8", "replace"))
            if stream is not None:
                return end(*stream.verdict())
            return end(*_unary_verdict(bytes(data)))
        except asyncio.CancelledError:
            end(CANCELLED, "the load was cancelled with the call in flight")
            raise
        except TimeoutError:  # asyncio's and aiohttp's timeouts both are
            return end(TIMEOUT, f"no whole answer within {self.timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            return end(CONNECT, _describe(exc))
        except (aiohttp.ClientError, OSError) as exc:
            reason = DISCONNECTED if status is None else TRUNCATED if status == 200 else f"http_{status}"
            return end(reason, _describe(exc))
        except Exception as exc:  # noqa: BLE001 - a call must end as a record whatever the client raised
            return end(EXCEPTION, _describe(exc))


@dataclass(slots=True)
class _Pending:
    """A launched call: what it is, when it was due, and whether it has ended as a record."""

    model: str
    streamed: bool
    t_due: float
    recorded: bool = False


class _SSE:
    """Reads a server-sent-event stream: did it reach [DONE], and did it carry an error event."""

    def __init__(self) -> None:
        self._buf = b""
        self.done = False
        self.error: str | None = None

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream."""
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self._line(line.strip())

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
        elif b'"error"' in data and self.error is None:  # cheap pre-check: only chunks that may carry one are parsed
            try:
                obj = json.loads(data)
            except ValueError:
                return
            # vLLM and the gateway send {"error": {...}} mid-stream; an error body itself is {"object": "error"}.
            if isinstance(obj, dict) and (obj.get("error") or obj.get("object") == "error"):
                self.error = data.decode("utf-8", "replace")

    def verdict(self) -> tuple[str | None, str]:
        """(failure reason or None, detail) once the stream has ended."""
        if self._buf.strip():
            self._line(self._buf.strip())
            self._buf = b""
        if not self.done:
            return TRUNCATED, "the stream ended without [DONE]" + (f": {self.error}" if self.error else "")
        if self.error is not None:
            return STREAM_ERROR, self.error
        return None, ""


def _unary_verdict(data: bytes) -> tuple[str | None, str]:
    try:
        obj = json.loads(data)
    except ValueError:
        return NO_CHOICES, f"the body is not JSON: {data[:200]!r}"
    if isinstance(obj, dict) and isinstance(obj.get("choices"), list) and obj["choices"]:
        return None, ""
    return NO_CHOICES, f"the body has no choices: {data[:200]!r}"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- summaries ------------------------------------------------------------------------------

def window(records: Iterable[CallRecord], t0: float | None = None, t1: float | None = None) -> list[CallRecord]:
    """The records sent in [t0, t1) (an open end where None)."""
    return [r for r in records if (t0 is None or r.t_send >= t0) and (t1 is None or r.t_send < t1)]


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """The nearest-rank p-th percentile (the smallest value with at least p% at or below it); None if empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def summary(records: Iterable[CallRecord], t0: float | None = None, t1: float | None = None) -> dict[str, Any]:
    """Counts and latencies of the calls sent in [t0, t1).

    Keys: t0, t1 (as given), sent (calls due, overload included), streamed, ok, failed (sent - ok),
    failures (reason -> count, sorted by reason), p50_s, p99_s, max_s (latency of the ok calls in
    seconds, nearest rank; None without an ok call).
    """
    w = window(records, t0, t1)
    lat = sorted(r.latency_s for r in w if r.ok)
    failures = Counter(r.error or "" for r in w if not r.ok)
    return {"t0": t0, "t1": t1, "sent": len(w), "streamed": sum(1 for r in w if r.streamed), "ok": len(lat),
            "failed": len(w) - len(lat), "failures": dict(sorted(failures.items())),
            "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99), "max_s": lat[-1] if lat else None}


def gaps(records: Iterable[CallRecord], model: str) -> Gap:
    """The longest interval in which no call of `model` succeeded (a proxy for zero healthy replicas).

    A success counts at its end. The span runs from the model's first send to its last call's end,
    so a model that never succeeded has one gap over all of it; a model without calls has Gap(0, 0).
    """
    mine = [r for r in records if r.model == model]
    if not mine:
        return Gap(model, 0.0, 0.0)
    start, stop = min(r.t_send for r in mine), max(r.t_end for r in mine)
    points = [start, *sorted(r.t_end for r in mine if r.ok), stop]
    a, b = max(zip(points, points[1:]), key=lambda ab: ab[1] - ab[0])
    return Gap(model, a, b)


# --- command line ----------------------------------------------------------------------------

def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:VALUE")
    return name.strip(), value.strip()


def build_arg_parser() -> argparse.ArgumentParser:
    """The parser of `python -m scepsy_hpc.drive.steady`."""
    p = argparse.ArgumentParser(prog="python -m scepsy_hpc.drive.steady",
                                description="Steady open-loop chat calls through an OpenAI-compatible URL; "
                                            "prints how many failed and why. Exit 1 if any call failed.")
    p.add_argument("--url", required=True, help="base URL ending in /v1, e.g. http://gateway:8000/v1")
    p.add_argument("--model", action="append", required=True, help="a model to call (repeat for round-robin)")
    p.add_argument("--rps", type=_positive, required=True, help="calls per second")
    p.add_argument("--duration", type=_positive, required=True, help="seconds to send for")
    p.add_argument("--stream-share", type=_share, default=0.5, help="share of calls streamed (default 0.5)")
    p.add_argument("--max-tokens", type=_count, default=16, help="output tokens per call (default 16)")
    p.add_argument("--prompt-tokens", type=_count, default=16, help="prompt tokens per call, about (default 16)")
    p.add_argument("--timeout", type=_positive, default=120.0, help="seconds a call may take (default 120)")
    p.add_argument("--max-in-flight", type=_count, default=256,
                   help="calls outstanding at most; a call due beyond it fails as overload (default 256)")
    p.add_argument("--poisson", action="store_true", help="Poisson arrivals (default: evenly spaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals (default 0)")
    p.add_argument("--header", type=_header, action="append", default=[], metavar="NAME:VALUE",
                   help="a header sent with every call (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.epilog = "The client key is read from $SCEPSY_API_KEY, else $OPENAI_API_KEY (never from the command line)."
    return p


def report(records: Sequence[CallRecord], models: Sequence[str]) -> dict[str, Any]:
    """`summary` of all records plus, under `per_model`, each model's summary and longest gap without success."""
    per_model = {}
    for m in models:
        mine = [r for r in records if r.model == m]
        gap = gaps(mine, m)
        per_model[m] = {**summary(mine), "longest_gap_s": gap.length_s, "gap_start_s": gap.start_s}
    return {**summary(records), "per_model": per_model}


def _text(doc: dict[str, Any]) -> str:
    def lat(s: dict[str, Any]) -> str:
        if s["p50_s"] is None:
            return "no ok call"
        return f"latency p50 {s['p50_s']:.3f} s, p99 {s['p99_s']:.3f} s, max {s['max_s']:.3f} s"

    lines = [f"{doc['sent']} calls ({doc['streamed']} streamed): {doc['ok']} ok, {doc['failed']} failed; {lat(doc)}"]
    if doc["failures"]:
        lines.append("  failures: " + ", ".join(f"{k} {v}" for k, v in doc["failures"].items()))
    for m, s in doc["per_model"].items():
        lines.append(f"  {m}: {s['sent']} calls, {s['ok']} ok, {s['failed']} failed; {lat(s)}; "
                     f"longest gap without success {s['longest_gap_s']:.3f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load from the command line; 0 if every call was ok, 1 if any failed."""
    from scepsy_hpc.errors import run_entry

    args = build_arg_parser().parse_args(argv)

    def body() -> int:
        load = SteadyLoad(args.url, args.model, args.rps, stream_share=args.stream_share, max_tokens=args.max_tokens,
                          prompt_tokens=args.prompt_tokens, timeout_s=args.timeout, max_in_flight=args.max_in_flight,
                          seed=args.seed, poisson=args.poisson, headers=dict(args.header),
                          api_key=os.environ.get("SCEPSY_API_KEY") or os.environ.get("OPENAI_API_KEY"))
        records = asyncio.run(load.run(args.duration))
        doc = {"url": args.url, "rps": args.rps, "duration_s": args.duration, "stream_share": args.stream_share,
               **report(records, list(dict.fromkeys(args.model)))}
        print(json.dumps(doc, indent=2) if args.json else _text(doc))
        return 1 if doc["failed"] else 0

    return run_entry(body, json_errors=args.json, prog="steady")


if __name__ == "__main__":
    sys.exit(main())
