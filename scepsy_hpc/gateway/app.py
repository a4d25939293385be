"""The gateway: one OpenAI-compatible endpoint for every LLM of one or more deployments, tracing each call.

Routes (also under `/r/{request_id}`, `/d/{deployment}` and `/d/{deployment}/r/{request_id}`, for
clients that can only set a base URL):
  POST /v1/chat/completions, POST /v1/completions, GET /v1/models
  GET /health, GET /metrics, GET /scepsy/v1/stats, POST /scepsy/v1/spans

A call's `model` is an LLM key or alias of the endpoints file; under `/d/{deployment}` it is first
tried as `{deployment}/{model}`, so a workflow's own LLM names work unchanged with the base URL
`http://gateway/d/{deployment}/v1`. A call's workflow request id comes from the path prefix or the
`X-Scepsy-Request` header (the path wins); its role from `X-Scepsy-Role` or the body's
`metadata.scepsy_role`.

The endpoints file is followed while serving: a replica removed from it drains (no new calls, its
in-flight ones finish; `GET /scepsy/v1/stats` lists it under `draining` until they have), and a
call that finds no replica able to take it (an empty pool while engines restart, every replica
refusing connections) holds for up to `hold_s` (`--hold-s`, default 60 s) before a 503.

With an `auth` section in the endpoints file, every route but `/health` needs a client key
(`auth.py`); a key calls only the LLMs of its deployments and within its limits. Every input is
bounded: bodies (`--max-body-mib`, 413), span events (64 KiB), header lines and the URL (8190
bytes), JSON nesting (400), the time a client may take to send its body (`--client-timeout-s`, 408)
and to send its next request on an idle connection; every refusal is an OpenAI-style JSON error,
malformed HTTP included, and a client that goes away costs one log line.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from functools import partial

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest

from scepsy_hpc.engine.metrics import PROMETHEUS_CONTENT_TYPE
from scepsy_hpc.gateway.admission import DEFAULT_IDLE_S, DEFAULT_WAIT_S, Admission, Refusal, Ticket
from scepsy_hpc.gateway.auth import ANY_DEPLOYMENT, KeyRing
from scepsy_hpc.gateway.endpoints import Endpoints, EndpointsWatcher
from scepsy_hpc.gateway.guard import CLIENT_KEY, SMALL_BODY_BYTES, guard, too_large
from scepsy_hpc.gateway.metrics import CallWindow, gateway_registry, gateway_stats
from scepsy_hpc.gateway.names import listing, names_in_scope, resolve, unknown_model_message
from scepsy_hpc.gateway.prefix import CallTracker, PrefixBook
from scepsy_hpc.gateway.proxy import Call, Forwarder, error_response, upstream_headers
from scepsy_hpc.gateway.routing import LLMPool, Router
from scepsy_hpc.gateway.tracing import ModelClock, SpanBook, SpanError, ToolBook, TraceSink, meta_record
from scepsy_hpc.trace.records import CallRecord, SpanRecord, TraceWriter

log = logging.getLogger("scepsy_hpc.gateway")

# Long prompts (and images) exceed aiohttp's 1 MiB default body limit; a few MiB hold a full 128k-token
# context several times over, and bound what one client can make the gateway hold.
DEFAULT_MAX_BODY_MIB = 8.0
MAX_BODY_BYTES = int(DEFAULT_MAX_BODY_MIB * 1024 * 1024)
# A client has this long to send its body, and an idle keep-alive connection (or one that has not finished
# its request line and headers) is closed after it.
DEFAULT_CLIENT_TIMEOUT_S = 30.0
# Below the 5 s keep-alive of uvicorn (vLLM, SGLang), so a pooled connection is never reused just as
# the engine closes it (which would fail a call that was never received).
KEEPALIVE_S = 4.0
WATCH_EVERY_S = 0.2  # one stat() of the endpoints file per interval when idle
# How long a call waits for a replica of its LLM when none can take it (engines restarting, a cut-over).
DEFAULT_HOLD_S = 60.0
# A request's calls to an LLM go back to the replica that served its previous one (its prefix is cached there)
# unless that replica is busier than the least-loaded one by more than the slack (routing.py). On: measured with
# `python scripts/bench_prefix_routing.py --seed 3` (2 sim llama-3.1-8b engines on h100-sxm, 40 ReAct requests x
# 8 turns, 8 in flight, 1000-token shared system prompt, 400-token tool results; model seconds, on vs off):
# prefix-cache hit rate 81.7% vs 72.9%, prefill tokens -32%, call latency p50 0.529 vs 0.544 s, p99 0.795 vs
# 0.840 s, request latency mean 7.85 vs 8.00 s, TTFT p50/p90 -9%/-35%; TTFT p99 0.100 vs 0.092 s (+9%: a few
# calls wait behind the busier replica the slack allows). Same direction at --time-scale 1.0, seeds 0-2.
DEFAULT_PREFIX_AFFINITY = True
# Routes are served at the root and under each of these (a request id, a deployment, or both).
PREFIXES = ("", "/r/{request_id}", "/d/{deployment}", "/d/{deployment}/r/{request_id}")


class GatewayState:
    """Everything one gateway app holds: routing, the client session, counters, spans, the trace sink."""

    def __init__(self, source: Endpoints | EndpointsWatcher, trace_writer: TraceWriter | None, time_scale: float,
                 *, connect_timeout_s: float = 5.0, down_for_s: float = 1.0, hold_s: float = DEFAULT_HOLD_S,
                 max_body_bytes: int = MAX_BODY_BYTES, client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S,
                 prefix_affinity: bool = DEFAULT_PREFIX_AFFINITY) -> None:
        if not 0 <= hold_s < float("inf"):
            raise ValueError(f"hold_s={hold_s} must be finite and >= 0")
        if hold_s > 0 and down_for_s <= 0:
            # A refused connection is retried once its replica's down period passes: none would be a hot loop.
            raise ValueError(f"down_for_s={down_for_s} must be > 0 when calls hold (hold_s={hold_s})")
        self.source = source
        self.router = Router(source, down_for_s=down_for_s, affinity=prefix_affinity)
        self.hold_s = hold_s
        self.clock = ModelClock(time_scale)
        self.time_scale = time_scale
        self.sink = TraceSink(trace_writer)
        self.spans = SpanBook()
        self.tracker = CallTracker(PrefixBook(), ToolBook(), self.put_span)
        self.connect_timeout_s = connect_timeout_s
        self.calls: dict[str, int] = {}   # per LLM key
        self.errors: dict[str, int] = {}
        self.windows: dict[str, CallWindow] = {}  # the last minute of completed calls, per LLM key
        self.started = time.monotonic()
        self.span_records = 0
        self._ids = itertools.count(1)
        self.session: aiohttp.ClientSession | None = None
        self.forwarder: Forwarder | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.keys = KeyRing()
        self.admission = Admission()   # the request caps (admission.py), from the endpoints file
        self._capped: Endpoints | None = None
        self.max_body_bytes = max_body_bytes
        self.client_timeout_s = client_timeout_s
        self.refusals: dict[str, int] = {}   # inputs refused by the gateway's bounds, by reason (stats, metrics)
        self.call_routes: set[web.AbstractRoute] = set()
        self.registry = gateway_registry(self)

    def refused(self, reason: str) -> None:
        """Count one input refused by a bound (body too large, client too slow, bad JSON, ...)."""
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def sync(self) -> Endpoints:
        """Follow the endpoints file (routing, keys and request caps); the endpoints in force."""
        self.router.sync()
        eps = self.router.endpoints()  # a watcher looks at the file at most once per poll interval
        self.keys.update(eps)
        self.follow_caps(eps)
        return eps

    def follow_caps(self, eps: Endpoints) -> None:
        """Apply the file's request caps and their times (model seconds, held here in wall seconds)."""
        if eps is self._capped:
            return
        self._capped = eps
        self.admission.idle_s = (eps.request_idle_s or DEFAULT_IDLE_S) * self.time_scale
        self.admission.wait_s = (eps.request_wait_s or DEFAULT_WAIT_S) * self.time_scale
        self.admission.configure(eps.request_caps())

    def put_span(self, rec: SpanRecord) -> None:
        """Trace one span record (paired from events, or inferred from the calls)."""
        self.sink.put(rec)
        self.span_records += 1

    def record(self, rec: CallRecord) -> None:
        """Count and trace one finished call."""
        if rec.status != "ok":
            self.errors[rec.llm] = self.errors.get(rec.llm, 0) + 1
        window = self.windows.get(rec.llm)
        if window is None:
            window = self.windows[rec.llm] = CallWindow()
        window.add(time.monotonic(), rec)
        self.sink.put(rec)

    async def startup(self, app: web.Application) -> None:
        """Open the pooled client session, the trace thread and the endpoints watch."""
        self.clock = ModelClock(self.time_scale)  # t0 = when the gateway starts serving
        self.started = self.clock.t0
        self.router.sync()
        self.follow_caps(self.router.endpoints())
        # No total timeout: a long generation may stream for minutes; only connecting is bounded.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        self.forwarder = Forwarder(self.session, self.router, self.clock, self.record, hold_s=self.hold_s,
                                   tracker=self.tracker)
        if self.sink.writer is not None:
            self.sink.put(meta_record(self.time_scale))
        self.sink.start()
        if isinstance(self.source, EndpointsWatcher):
            self._watch_task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        # Also reloads with no traffic, so a bad file is reported and queued calls see new replicas.
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            try:
                self.router.sync()
                self.follow_caps(self.router.endpoints())
            except Exception:
                log.exception("endpoints watch failed")

    async def cleanup(self, app: web.Application) -> None:
        """Stop watching, close the session, write out the trace."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            try:
                await self._watch_task
            except asyncio.CancelledError:
                pass
        if self.session is not None:
            await self.session.close()
        await asyncio.to_thread(self.sink.close)

    def next_call_id(self) -> str:
        """A gateway-unique call id."""
        return f"c-{next(self._ids):06d}"

    def continue_call_ids(self, after: int) -> None:
        """Number calls from `after + 1` (a trace appended to keeps its call ids unique)."""
        self._ids = itertools.count(after + 1)


STATE = web.AppKey("scepsy_gateway_state", GatewayState)


def _bad_request(message: str, code: str, param: str | None = None) -> web.Response:
    return error_response(400, message, "invalid_request_error", code, param)


def _parse_json(raw: bytes, what: str) -> object | web.Response:
    """The parsed body, or a 400 (bad JSON, bad UTF-8, or nesting too deep for the parser)."""
    try:
        return json.loads(raw)
    except RecursionError:
        return _bad_request(f"{what} is nested too deeply to parse; a request is a JSON object a few levels deep",
                            "invalid_json")
    except ValueError as exc:   # UnicodeDecodeError included
        return _bad_request(f"{what} is not valid JSON: {str(exc)[:200]}", "invalid_json")


def _shape_problem(upstream_path: str, body: dict[str, object]) -> web.Response | None:
    """A 400 for a body whose main fields have the wrong type (cheap checks; the engine checks the rest)."""
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        return _bad_request(f"'stream' must be true or false, got {type(body['stream']).__name__}", "invalid_type",
                            "stream")
    if upstream_path == "/v1/chat/completions":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            return _bad_request("'messages' must be a non-empty list of objects like {\"role\": \"user\", "
                                "\"content\": \"...\"}", "invalid_type", "messages")
    elif not isinstance(body.get("prompt"), (str, list)):
        return _bad_request("'prompt' must be a string or a list (of strings or token ids)", "invalid_type", "prompt")
    return None


def _in_scope(st: GatewayState, request: web.Request) -> dict[str, str]:
    """The accepted names (→ LLM key) that the call's key may call (all of them without keys)."""
    accepted = st.router.accepted_names()
    key = request.get(CLIENT_KEY)
    if key is None:
        return accepted
    return {name: llm for name, llm in accepted.items() if st.keys.may_call(key, llm)}


def _out_of_scope(st: GatewayState, request: web.Request, pool: LLMPool, model: str,
                  deployment: str | None) -> web.Response | None:
    """A 404 when the call's key may not call `pool`'s LLM (another deployment's LLMs do not exist for it)."""
    key = request.get(CLIENT_KEY)
    if key is None or st.keys.may_call(key, pool.name):
        return None
    st.keys.refuse(key)
    scope = _in_scope(st, request)
    names = listing(names_in_scope(scope, deployment)) if scope else "(none)"
    return error_response(404, f"model {model!r} does not exist or key {key.id} may not call it; this key may call: "
                          f"{names}. Another deployment's LLMs need its own key: `scepsy keys show NAME`",
                          "invalid_request_error", "model_not_found", "model")


async def _handle_call(upstream_path: str, request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    raw = await request.read()   # already read, bounded in size and time, by the guard
    body = _parse_json(raw, "request body")
    if isinstance(body, web.Response):
        st.refused("invalid_json")
        return body
    if not isinstance(body, dict):
        return _bad_request(f"request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    model = body.get("model")
    deployment = request.match_info.get("deployment")
    if not isinstance(model, str) or not model:
        names = listing(names_in_scope(_in_scope(st, request), deployment))
        return _bad_request(f"the request has no 'model'; set it to one of the LLM names of this gateway ({names})",
                            "missing_model", "model")
    bad_shape = _shape_problem(upstream_path, body)
    if bad_shape is not None:
        return bad_shape
    pool = resolve(st.router, model, deployment)
    if pool is None:
        return _unknown_model(_in_scope(st, request), model, deployment)
    refused = _out_of_scope(st, request, pool, model, deployment)
    if refused is not None:
        return refused
    request_id = request.match_info.get("request_id") or request.headers.get("X-Scepsy-Request") or None
    role = request.headers.get("X-Scepsy-Role") or None
    changed = False
    meta = body.get("metadata")
    if isinstance(meta, dict) and "scepsy_role" in meta:
        body_role = meta.pop("scepsy_role")
        role = role or (str(body_role) if body_role is not None else None)
        if not meta:
            del body["metadata"]
        changed = True
    if pool.served_model != model:
        body["model"] = pool.served_model
        changed = True
    stream = body.get("stream") is True
    drop_usage = False
    if stream:
        opts = body.get("stream_options")
        if not (isinstance(opts, dict) and opts.get("include_usage")):
            # Ask for usage to learn token counts; the client did not, so its chunk is dropped later.
            body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
            drop_usage = changed = True
    ticket = await _admit(st, request, pool, request_id)
    if isinstance(ticket, web.StreamResponse):
        return ticket
    try:
        st.calls[pool.name] = st.calls.get(pool.name, 0) + 1
        chat = upstream_path == "/v1/chat/completions"
        prompt = st.tracker.prefixes.prompt(body, chat=chat)
        call = Call(prompt=prompt, messages=body.get("messages") if chat else None,
                    llm=pool.name, pool=pool, path=upstream_path, body=json.dumps(body).encode() if changed else raw,
                    headers=upstream_headers(request.headers.items()), stream=stream, drop_usage=drop_usage,
                    request_id=request_id, role=role, model=pool.served_model, call_id=st.next_call_id(),
                    authorization=None if st.router.client_keys else request.headers.get("Authorization"))
        assert st.forwarder is not None  # set on startup
        return await st.forwarder.forward(request, call)
    finally:
        ticket.leave()


async def _admit(st: GatewayState, request: web.Request, pool: LLMPool,
                 request_id: str | None) -> Ticket | web.StreamResponse:
    """The call's ticket under its deployment's request cap (admission.py), or the 503 that refuses it."""
    key = request.get(CLIENT_KEY)
    # a call waiting at the request cap holds no slot of its key: the key's admitted requests go on calling
    got = await st.admission.enter(st.keys.deployment_of(pool.name), request_id,
                                   None if key is None else partial(st.keys.set_waiting, key))
    if isinstance(got, Refusal):
        return error_response(503, got.message, "server_error", "request_cap",
                              headers={"Retry-After": str(got.retry_after_s)})
    if request.transport is None or request.transport.is_closing():
        got.leave(abandoned=True)   # its client left while it waited (aiohttp does not cancel the handler)
        return error_response(499, "the client went away while its call waited at the request cap", "client_closed",
                              "client_closed")
    return got


def _unknown_model(accepted: dict[str, str], model: str | None, deployment: str | None) -> web.Response:
    return error_response(404, unknown_model_message(accepted, model, deployment), "invalid_request_error",
                          "model_not_found", "model")


async def _handle_not_served(request: web.Request) -> web.Response:
    return error_response(404, f"{request.method} {request.path} is not served by the scepsy gateway; it serves "
                          "POST /v1/chat/completions, POST /v1/completions and GET /v1/models",
                          "invalid_request_error", "route_not_found")


async def _handle_models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    deployment = request.match_info.get("deployment")
    accepted = _in_scope(st, request)   # only what the call's key may call
    names = names_in_scope(accepted, deployment)
    if deployment is not None and not names:
        return _unknown_model(accepted, None, deployment)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "scepsy",
             **({"scepsy_target": key} if key != name else {})} for name, key in names.items()]
    return web.json_response({"object": "list", "data": data})


async def _handle_health(request: web.Request) -> web.Response:
    st = request.app[STATE]
    return web.json_response({"status": "ok", "llms": st.router.names()})


async def _handle_metrics(request: web.Request) -> web.Response:
    st = request.app[STATE]
    return web.Response(body=generate_latest(st.registry),
                        headers={"Content-Type": PROMETHEUS_CONTENT_TYPE, "X-Content-Type-Options": "nosniff"})


async def _handle_stats(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st.router.sync(force=True)  # the daemon reads this right after writing the file: it must be reflected
    st.keys.update(st.router.endpoints())
    st.follow_caps(st.router.endpoints())
    return web.json_response(gateway_stats(st))


async def _handle_span(request: web.Request) -> web.Response:
    st = request.app[STATE]
    now = st.clock()  # stamped on arrival (the guard read the body first: it is small, and bounded)
    raw = await request.read()
    if len(raw) > SMALL_BODY_BYTES:   # sent chunked: no Content-Length for the guard to refuse it by
        st.refused("body_too_large")
        return too_large(len(raw), SMALL_BODY_BYTES)
    body = _parse_json(raw, "span event")
    if isinstance(body, web.Response):
        st.refused("invalid_json")
        return body
    if isinstance(body, dict) and body.get("span") == "request" and body.get("event") == "end" \
            and isinstance(body.get("request"), str):
        # the request's slot under the cap goes even when its start is not on record (never sent, or dropped):
        # only in the deployments the reporting key may call
        key = request.get(CLIENT_KEY)
        st.admission.end(body["request"], lambda scope: key is None or ANY_DEPLOYMENT in key.deployments
                         or scope in key.deployments)
    try:
        rec = st.spans.event(body, now)
    except SpanError as exc:
        return _bad_request(str(exc), "invalid_span")
    st.tracker.span_event(body)
    if body.get("span") == "request" and body.get("event") == "end":   # the request's routing state goes too
        st.router.forget(body["request"])
    if rec is None:
        return web.json_response({"ok": True, "t": now})
    st.put_span(rec)
    return web.json_response({"ok": True, "t_start": rec.t_start, "t_end": rec.t_end})


def make_app(endpoints_source: Endpoints | EndpointsWatcher, trace_writer: TraceWriter | None = None,
             time_scale: float = 1.0, *, connect_timeout_s: float = 5.0, down_for_s: float = 1.0,
             hold_s: float = DEFAULT_HOLD_S, max_body_bytes: int = MAX_BODY_BYTES,
             client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S,
             prefix_affinity: bool = DEFAULT_PREFIX_AFFINITY) -> web.Application:
    """The gateway as an aiohttp application (a watcher must have been `load()`ed).

    `hold_s`: how long a call waits for a replica when none can take it (0: it fails at once).
    `max_body_bytes`: the largest call body (413 above); `client_timeout_s`: how long a client may take
    to send its body (408 after); `prefix_affinity`: keep a request's calls on its replica (routing.py)."""
    app = web.Application(client_max_size=max_body_bytes, middlewares=[guard(STATE)])
    st = GatewayState(endpoints_source, trace_writer, time_scale, connect_timeout_s=connect_timeout_s,
                      down_for_s=down_for_s, hold_s=hold_s, max_body_bytes=max_body_bytes,
                      client_timeout_s=client_timeout_s, prefix_affinity=prefix_affinity)
    app[STATE] = st
    for prefix in PREFIXES:
        for path in ("/v1/chat/completions", "/v1/completions"):
            st.call_routes.add(app.router.add_post(prefix + path, partial(_handle_call, path)))
        app.router.add_get(prefix + "/v1/models", _handle_models)
        app.router.add_route("*", prefix + "/v1/{tail:.*}", _handle_not_served)
    app.router.add_get("/health", _handle_health)
    app.router.add_get("/metrics", _handle_metrics)
    app.router.add_get("/scepsy/v1/stats", _handle_stats)
    app.router.add_post("/scepsy/v1/spans", _handle_span)
    app.on_startup.append(st.startup)
    app.on_cleanup.append(st.cleanup)
    return app
