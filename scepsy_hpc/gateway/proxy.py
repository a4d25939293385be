"""Forwarding one LLM call: pick a replica, fail over if it is unreachable, relay the answer, trace it.

A connection that was refused or failed before the request was sent never reached the engine, so it
is always safe to retry: the replica is marked down and the call goes to another one that is not,
or holds (`routing.Hold`, up to `hold_s`) until one is, which may be the same replica once its
down period has passed, as often as it takes within the hold. A call that finds no replica at all
(the LLM's pool is empty while its engines restart or move) holds the same way; when the hold runs
out the client gets a 503 saying how long it waited. With `hold_s` 0 neither waits: a refused
replica is skipped for an untried one and the call fails once every replica was tried.

A call that failed after the request was sent and before any byte reached the client (the replica
answered 5xx, closed the connection before or while answering a non-streamed call, or ended a
stream before its first byte: the client's 200 waits for the engine's first bytes) is retried once
on another replica, or, under a hold, after a closed connection, on the same one when it is the only
one (an engine restarting on its port); a stream that already sent bytes never is. Every failure left becomes an
OpenAI-style error for the client and a traced call with status "error"; none may escape and take
the gateway down.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable

import aiohttp
from aiohttp import web

from scepsy_hpc.gateway.prefix import Answer, CallTracker, Prompt
from scepsy_hpc.gateway.routing import Hold, LLMPool, NoReplicaError, ReplicaState, Router
from scepsy_hpc.gateway.stream import SSEFilter, error_message
from scepsy_hpc.trace.records import CallRecord

# Headers that describe one hop, not the call; aiohttp sets its own.
HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
                         "trailer", "proxy-authorization", "proxy-connection", "accept-encoding"})



@lru_cache(maxsize=512)   # header names repeat from call to call; bounded, so odd names cannot grow it
def _forwarded(name: str) -> bool:
    low = name.lower()
    # Authorization is never copied: the replica's secret replaces it, or `upstream_headers` keeps it apart.
    # Cookies are the client's business with us, not the engine's; X-Sim-* are test hooks of the sim engine,
    # which a client must never reach through the gateway.
    return (low not in HOP_HEADERS and low not in ("authorization", "cookie")
            and not low.startswith(("x-scepsy-", "x-sim-")))


def upstream_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The client's headers that go on to the engine: not hop-by-hop, not ours (X-Scepsy-*), no Authorization;
    the body is always JSON."""
    headers = {k: v for k, v in items if _forwarded(k)}
    headers["Content-Type"] = "application/json"
    return headers


_NONE: frozenset[str] = frozenset()

# Errors that mean the request never reached the replica, so another replica may safely take it.
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# Errors of a connection that was established and then failed.
_LINK_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def error_json(message: str, type_: str, code: int | str | None, param: str | None = None) -> bytes:
    """An OpenAI-style error body."""
    err: dict[str, Any] = {"message": message, "type": type_}
    if param is not None:
        err["param"] = param
    err["code"] = code
    return json.dumps({"error": err}).encode()


def error_response(status: int, message: str, type_: str, code: int | str | None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """An OpenAI-style error response."""
    return web.Response(status=status, body=error_json(message, type_, code, param), content_type="application/json",
                        headers=headers)


def unreachable_reason(exc: BaseException) -> str:
    """A few words on why a connection could not be made."""
    if isinstance(exc, (aiohttp.ConnectionTimeoutError, asyncio.TimeoutError)):
        return "connect timeout"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "cannot resolve host"
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror.lower()
    return str(exc) or type(exc).__name__


def upstream_message(data: bytes) -> str:
    """The message of an engine's error body (OpenAI, vLLM or FastAPI style), else its text."""
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        if obj.get("error") is not None:
            return error_message(obj["error"])
        for key in ("message", "detail"):
            if isinstance(obj.get(key), str):
                return obj[key]
    text = data.decode("utf-8", "replace").strip()
    return (text[:500] + "…" if len(text) > 500 else text) or "(empty body)"


@dataclass(frozen=True)
class Call:
    """One client call, parsed and ready to forward."""

    llm: str
    pool: LLMPool
    path: str  # /v1/chat/completions or /v1/completions
    body: bytes
    headers: dict[str, str]
    stream: bool
    drop_usage: bool
    request_id: str | None
    role: str | None
    model: str
    call_id: str
    # The client's own Authorization, passed on only where the replica has no secret and the gateway
    # checks no client keys (a hand-run gateway in front of engines the client holds the key of).
    authorization: str | None = field(default=None, repr=False)
    # The prompt hashed for prefix accounting, and the chat messages (tool results close inferred tool spans).
    prompt: Prompt | None = field(default=None, repr=False)
    messages: Any = field(default=None, repr=False)


class _Outcome:
    """What the trace record will say; filled in as the call proceeds."""

    __slots__ = ("status", "error", "http_status", "replica", "t_first", "usage", "answer")

    def __init__(self) -> None:
        self.status = "ok"
        self.error: str | None = None
        self.http_status: int | None = None
        self.replica: str | None = None
        self.t_first: float | None = None
        self.usage: dict[str, Any] | None = None
        self.answer: Answer | None = None   # collected only for calls the tracker follows

    def fail(self, message: str, http_status: int | None = None) -> None:
        self.status, self.error = "error", message
        if http_status is not None:
            self.http_status = http_status

    def retried(self) -> None:
        """The call goes to another replica: what the first one did is no longer the outcome."""
        self.status, self.error, self.http_status, self.t_first, self.usage = "ok", None, None, None, None
        if self.answer is not None:
            self.answer.reset()   # what the first replica said is not the answer


def _tokens(usage: dict[str, Any] | None, key: str) -> int | None:
    v = usage.get(key) if usage else None
    return v if isinstance(v, int) else None


class Forwarder:
    """Sends calls to replicas through one pooled ClientSession and reports each as a CallRecord."""

    def __init__(self, session: aiohttp.ClientSession, router: Router, clock: Callable[[], float],
                 on_record: Callable[[CallRecord], None], *, hold_s: float = 0.0,
                 tracker: CallTracker | None = None) -> None:
        self.session = session
        self.tracker = tracker
        self.router = router
        self.clock = clock
        self.on_record = on_record
        self.hold_s = hold_s

    async def forward(self, request: web.Request, call: Call) -> web.StreamResponse:
        """Forward `call` and return the client's response; always emits one CallRecord."""
        t_start = self.clock()
        out = _Outcome()
        tracked = None
        if self.tracker is not None:
            tracked = self.tracker.start(call.request_id, call.call_id, call.llm, call.prompt, call.messages, t_start)
            if call.prompt is not None and call.request_id is not None:
                out.answer = tracked.answer
        try:
            return await self._forward(request, call, out)
        except asyncio.CancelledError:
            out.fail("cancelled (client went away or the gateway is stopping)")
            raise
        except Exception as exc:  # a bug here must cost one call, not the gateway
            out.fail(f"gateway error: {type(exc).__name__}: {exc}", 500)
            return error_response(500, f"llm {call.llm!r}: gateway error: {type(exc).__name__}: {exc}", "gateway_error", 500)
        finally:
            t_end = self.clock()
            shared: tuple[int | None, int | None] = (None, None)
            if tracked is not None:
                assert self.tracker is not None
                shared = self.tracker.finish(call.request_id, call.llm, tracked, out.status == "ok", out.usage, t_end)
            self.on_record(CallRecord(
                request=call.request_id, llm=call.llm, role=call.role, t_start=t_start, t_first=out.t_first,
                t_end=t_end, prefix_tokens=shared[0], system_tokens=shared[1], prompt_tokens=_tokens(out.usage, "prompt_tokens"),
                completion_tokens=_tokens(out.usage, "completion_tokens"), status=out.status, error=out.error,
                http_status=out.http_status, replica=out.replica, model=call.model, stream=call.stream,
                call_id=call.call_id))

    async def _forward(self, request: web.Request, call: Call, out: _Outcome) -> web.StreamResponse:
        tried: list[tuple[str, str]] = []   # replicas this call may not go to again, and why
        refused: dict[str, str] = {}   # under a hold: replicas that refused the connection (retried once up)
        hold = Hold(self.hold_s) if self.hold_s > 0 else None
        headers = {"X-Scepsy-Call": call.call_id}
        first_failure: tuple[web.Response, str, int | None] | None = None   # kept while its one retry runs
        retry_same = False
        link_cut = False    # the first failure was the connection closing (an engine that died), not an answer
        while True:
            try:
                replica = await self.router.acquire(call.pool, frozenset(u for u, _ in tried) if tried else _NONE,
                                                    avoid_down=bool(refused), hold=hold, request=call.request_id)
            except NoReplicaError as exc:
                if first_failure is not None and hold is not None and tried and link_cut and not retry_same:
                    # no other replica for the one retry: the same one may take it (an engine restarting on its port;
                    # a refused connection holds until it is up, within the hold)
                    retry_same = True
                    tried = []
                    continue
                if first_failure is not None:   # no other replica for the retry: the first answer stands
                    resp, msg, status = first_failure
                    out.fail(msg, status)
                    return resp
                if exc.held_s is not None:
                    last = "; ".join(f"{u} unreachable ({why})" for u, why in refused.items())
                    msg = f"{exc.message}{f' (last tried: {last})' if last else ''}"
                    out.fail(msg, 503)
                    return error_response(503, msg, "upstream_unavailable", 503, headers=headers)
                if tried:
                    what = ", ".join(f"{u} unreachable ({why})" for u, why in tried)
                    msg = f"llm {call.llm!r}: replica{'s' if len(tried) > 1 else ''} {what}; no other replica"
                    out.fail(msg, 502)
                    return error_response(502, msg, "upstream_unavailable", 502, headers=headers)
                out.fail(exc.message, 503)
                return error_response(503, exc.message, "upstream_unavailable", 503, headers=headers)
            out.replica = replica.url
            auth = replica.authorization or call.authorization
            try:
                upstream = await self.session.post(replica.url + call.path, data=call.body,
                                                   headers=call.headers if auth is None
                                                   else {**call.headers, "Authorization": auth})
            except _CONNECT_ERRORS as exc:
                # The request was never sent: any replica may take it, this one too once it is up again.
                self.router.release(replica)
                self.router.mark_down(replica)
                if hold is None:
                    tried.append((replica.url, unreachable_reason(exc)))
                else:
                    refused[replica.url] = unreachable_reason(exc)
                continue
            except _LINK_ERRORS as exc:
                self.router.release(replica)
                msg = f"llm {call.llm!r}: replica {replica.url} closed the connection before answering ({_describe(exc)})"
                out.fail(msg, 502)
                resp = error_response(502, msg, "upstream_error", 502, headers=headers)
                if first_failure is None:
                    first_failure, link_cut = (resp, msg, 502), True
                    tried.append((replica.url, "closed the connection"))
                    out.retried()
                    continue
                return resp
            except BaseException:
                self.router.release(replica)
                raise
            self.router.mark_up(replica)
            try:
                if call.stream and upstream.status == 200 and upstream.content_type == "text/event-stream":
                    try:
                        return await self._relay_stream(request, call, upstream, replica, out, headers)
                    except _NothingSent as cut:   # nothing reached the client: as a connection closed before answering
                        out.fail(str(cut), 502)
                        if first_failure is None:
                            first_failure = (error_response(502, str(cut), "upstream_error", 502, headers=headers),
                                             str(cut), 502)
                            link_cut = True
                            tried.append((replica.url, "closed the stream before its first byte"))
                            out.retried()
                            continue
                        return first_failure[0]
                resp, retriable = await self._relay_unary(call, upstream, replica, out, headers)
            finally:
                upstream.release()
                self.router.release(replica)
            if retriable and first_failure is None:   # nothing reached the client yet: once more, elsewhere
                first_failure = (resp, out.error or "", out.http_status)
                tried.append((replica.url, f"answered {out.http_status}"))
                out.retried()
                continue
            return resp

    async def _relay_unary(self, call: Call, upstream: aiohttp.ClientResponse, replica: ReplicaState,
                           out: _Outcome, headers: dict[str, str]) -> tuple[web.Response, bool]:
        """The client's response to a whole (non-streamed) answer, and whether another replica may retry it
        (a failure of the replica's, with nothing sent to the client yet)."""
        status = out.http_status = upstream.status
        try:
            data = await upstream.read()
        except _LINK_ERRORS as exc:
            msg = f"llm {call.llm!r}: replica {replica.url} closed the connection mid-response ({_describe(exc)})"
            out.fail(msg, 502)
            return error_response(502, msg, "upstream_error", 502, headers=dict(headers)), True
        if status >= 500:
            msg = f"llm {call.llm!r}: replica {replica.url} returned HTTP {status}: {upstream_message(data)}"
            out.fail(msg)
            return error_response(status, msg, "upstream_error", status, headers=dict(headers)), True
        if status >= 400:
            out.fail(upstream_message(data))  # the engine's own complaint about the request: passed through as is
        else:
            try:
                obj = json.loads(data)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                out.usage = obj["usage"]
            if out.answer is not None:
                out.answer.take_body(obj)
        return web.Response(status=status, body=data,
                            headers={**headers, "Content-Type": upstream.headers.get("Content-Type", "application/json")}), False

    async def _relay_stream(self, request: web.Request, call: Call, upstream: aiohttp.ClientResponse,
                            replica: ReplicaState, out: _Outcome, headers: dict[str, str]) -> web.StreamResponse:
        out.http_status = 200
        sse = SSEFilter(self.clock, drop_usage=call.drop_usage)
        delivered_done = False
        resp = web.StreamResponse(status=200, headers={**headers, "Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
        failure: BaseException | None = None
        chunks = upstream.content.iter_any().__aiter__()
        try:   # the client's 200 waits for the engine's first bytes: a stream cut before them can still be retried
            first = await chunks.__anext__()
        except (StopAsyncIteration, *_LINK_ERRORS) as exc:
            raise _NothingSent(f"llm {call.llm!r}: replica {replica.url} closed the stream before its first byte"
                               + (f" ({_describe(exc)})" if not isinstance(exc, StopAsyncIteration) else "")) from None
        try:
            await resp.prepare(request)
            data: bytes | None = first
            while True:
                if data is None:
                    try:
                        data = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    except _LINK_ERRORS as exc:
                        failure = exc
                        break
                piece, data = sse.feed(data), None
                if piece and out.answer is not None:
                    out.answer.feed_sse(piece)
                if piece:
                    await resp.write(piece)  # as it arrives: no buffering of the whole answer
                    delivered_done = sse.done
            tail = sse.flush()
            if tail and out.answer is not None:
                out.answer.feed_sse(tail)
            if tail:
                await resp.write(tail)
            out.t_first, out.usage = sse.t_first, sse.usage
            if failure is not None or not sse.done:
                how = f" ({_describe(failure)})" if failure is not None else " before [DONE]"
                msg = f"llm {call.llm!r}: replica {replica.url} closed the connection mid-stream after {sse.chunks} chunks{how}"
                out.fail(msg)
                # The 200 status is already sent; an error event is how OpenAI clients learn of it.
                await resp.write(b"data: " + error_json(msg, "upstream_error", 502) + b"\n\n")
            elif sse.error is not None:
                out.fail(f"llm {call.llm!r}: replica {replica.url} sent an error event: {sse.error}")
            await resp.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            # The client went away: drop the upstream connection so the engine aborts the generation.
            upstream.close()
            out.t_first, out.usage = sse.t_first, sse.usage
            if not delivered_done:  # a client that hangs up once [DONE] is written has had the whole answer
                out.fail(f"client disconnected mid-stream ({_describe(exc)})")
        return resp


class _NothingSent(Exception):
    """A stream that ended before its first byte reached the client (so it may be retried)."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the response was cut off"  # aiohttp's own text is a nested repr of the transfer-encoding error
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
