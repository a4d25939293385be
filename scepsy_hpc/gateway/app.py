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
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import json
import logging
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import IO, Sequence

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest

from scepsy_hpc.engine.metrics import PROMETHEUS_CONTENT_TYPE
from scepsy_hpc.errors import ScepsyError, SpecError, run_entry
from scepsy_hpc.gateway.endpoints import Endpoints, EndpointsWatcher
from scepsy_hpc.gateway.metrics import CallWindow, gateway_registry, gateway_stats
from scepsy_hpc.gateway.names import listing, names_in_scope, resolve, unknown_model_message
from scepsy_hpc.gateway.proxy import Call, Forwarder, error_response, upstream_headers
from scepsy_hpc.gateway.routing import Router
from scepsy_hpc.gateway.tracing import ModelClock, SpanBook, SpanError, TraceSink, meta_record
from scepsy_hpc.spec.records import write_atomic
from scepsy_hpc.trace.records import CallRecord, TraceWriter

log = logging.getLogger("scepsy_hpc.gateway")

# Long prompts (and images) exceed aiohttp's 1 MiB default body limit.
MAX_BODY_BYTES = 64 * 1024 * 1024
# Below the 5 s keep-alive of uvicorn (vLLM, SGLang), so a pooled connection is never reused just as
# the engine closes it (which would fail a call that was never received).
KEEPALIVE_S = 4.0
WATCH_EVERY_S = 0.2  # one stat() of the endpoints file per interval when idle
# How long a call waits for a replica of its LLM when none can take it (engines restarting, a cut-over).
DEFAULT_HOLD_S = 60.0
# Routes are served at the root and under each of these (a request id, a deployment, or both).
PREFIXES = ("", "/r/{request_id}", "/d/{deployment}", "/d/{deployment}/r/{request_id}")


class GatewayState:
    """Everything one gateway app holds: routing, the client session, counters, spans, the trace sink."""

    def __init__(self, source: Endpoints | EndpointsWatcher, trace_writer: TraceWriter | None, time_scale: float,
                 *, connect_timeout_s: float = 5.0, down_for_s: float = 1.0, hold_s: float = DEFAULT_HOLD_S) -> None:
        if not 0 <= hold_s < float("inf"):
            raise ValueError(f"hold_s={hold_s} must be finite and >= 0")
        if hold_s > 0 and down_for_s <= 0:
            # A refused connection is retried once its replica's down period passes: none would be a hot loop.
            raise ValueError(f"down_for_s={down_for_s} must be > 0 when calls hold (hold_s={hold_s})")
        self.source = source
        self.router = Router(source, down_for_s=down_for_s)
        self.hold_s = hold_s
        self.clock = ModelClock(time_scale)
        self.time_scale = time_scale
        self.sink = TraceSink(trace_writer)
        self.spans = SpanBook()
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
        self.registry = gateway_registry(self)

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
        # No total timeout: a long generation may stream for minutes; only connecting is bounded.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        self.forwarder = Forwarder(self.session, self.router, self.clock, self.record, hold_s=self.hold_s)
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


STATE = web.AppKey("scepsy_gateway_state", GatewayState)


def _bad_request(message: str, code: str, param: str | None = None) -> web.Response:
    return error_response(400, message, "invalid_request_error", code, param)


async def _handle_call(upstream_path: str, request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return _bad_request(f"request body is not valid JSON: {exc}", "invalid_json")
    if not isinstance(body, dict):
        return _bad_request(f"request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    model = body.get("model")
    deployment = request.match_info.get("deployment")
    st.router.sync()
    if not isinstance(model, str) or not model:
        names = listing(names_in_scope(st.router.accepted_names(), deployment))
        return _bad_request(f"the request has no 'model'; set it to one of the LLM names of this gateway ({names})",
                            "missing_model", "model")
    pool = resolve(st.router, model, deployment)
    if pool is None:
        return _unknown_model(st.router.accepted_names(), model, deployment)
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
    st.calls[pool.name] = st.calls.get(pool.name, 0) + 1
    call = Call(llm=pool.name, pool=pool, path=upstream_path, body=json.dumps(body).encode() if changed else raw,
                headers=upstream_headers(request.headers.items()), stream=stream, drop_usage=drop_usage,
                request_id=request_id, role=role, model=pool.served_model, call_id=st.next_call_id(),
                authorization=None if st.router.client_keys else request.headers.get("Authorization"))
    assert st.forwarder is not None  # set on startup
    return await st.forwarder.forward(request, call)


def _unknown_model(accepted: dict[str, str], model: str | None, deployment: str | None) -> web.Response:
    return error_response(404, unknown_model_message(accepted, model, deployment), "invalid_request_error",
                          "model_not_found", "model")


async def _handle_not_served(request: web.Request) -> web.Response:
    return error_response(404, f"{request.method} {request.path} is not served by the scepsy gateway; it serves "
                          "POST /v1/chat/completions, POST /v1/completions and GET /v1/models",
                          "invalid_request_error", "route_not_found")


async def _handle_models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st.router.sync()
    deployment = request.match_info.get("deployment")
    accepted = st.router.accepted_names()
    names = names_in_scope(accepted, deployment)
    if deployment is not None and not names:
        return _unknown_model(accepted, None, deployment)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "scepsy",
             **({"scepsy_target": key} if key != name else {})} for name, key in names.items()]
    return web.json_response({"object": "list", "data": data})


async def _handle_health(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st.router.sync()
    return web.json_response({"status": "ok", "llms": st.router.names()})


async def _handle_metrics(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st.router.sync()
    return web.Response(body=generate_latest(st.registry),
                        headers={"Content-Type": PROMETHEUS_CONTENT_TYPE, "X-Content-Type-Options": "nosniff"})


async def _handle_stats(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st.router.sync(force=True)  # the daemon reads this right after writing the file: it must be reflected
    return web.json_response(gateway_stats(st))


async def _handle_span(request: web.Request) -> web.Response:
    st = request.app[STATE]
    now = st.clock()  # stamped on arrival, before anything else can delay it
    try:
        body = json.loads(await request.read())
    except ValueError as exc:
        return _bad_request(f"span event is not valid JSON: {exc}", "invalid_json")
    try:
        rec = st.spans.event(body, now)
    except SpanError as exc:
        return _bad_request(str(exc), "invalid_span")
    if rec is None:
        return web.json_response({"ok": True, "t": now})
    st.sink.put(rec)
    st.span_records += 1
    return web.json_response({"ok": True, "t_start": rec.t_start, "t_end": rec.t_end})


def make_app(endpoints_source: Endpoints | EndpointsWatcher, trace_writer: TraceWriter | None = None,
             time_scale: float = 1.0, *, connect_timeout_s: float = 5.0, down_for_s: float = 1.0,
             hold_s: float = DEFAULT_HOLD_S) -> web.Application:
    """The gateway as an aiohttp application (a watcher must have been `load()`ed).

    `hold_s`: how long a call waits for a replica when none can take it (0: it fails at once)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    st = GatewayState(endpoints_source, trace_writer, time_scale, connect_timeout_s=connect_timeout_s,
                      down_for_s=down_for_s, hold_s=hold_s)
    app[STATE] = st
    for prefix in PREFIXES:
        app.router.add_post(prefix + "/v1/chat/completions", partial(_handle_call, "/v1/chat/completions"))
        app.router.add_post(prefix + "/v1/completions", partial(_handle_call, "/v1/completions"))
        app.router.add_get(prefix + "/v1/models", _handle_models)
        app.router.add_route("*", prefix + "/v1/{tail:.*}", _handle_not_served)
    app.router.add_get("/health", _handle_health)
    app.router.add_get("/metrics", _handle_metrics)
    app.router.add_get("/scepsy/v1/stats", _handle_stats)
    app.router.add_post("/scepsy/v1/spans", _handle_span)
    app.on_startup.append(st.startup)
    app.on_cleanup.append(st.cleanup)
    return app


class Gateway:
    """A gateway serving in this process's event loop."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, trace_file: IO[str] | None) -> None:
        self.runner = runner
        self.host = host
        self.port = port
        self._trace_file = trace_file
        self._closed = False

    @property
    def url(self) -> str:
        """Base URL (clients use url + "/v1")."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def state(self) -> GatewayState:
        """The app's state (router, counters)."""
        return self.runner.app[STATE]

    async def close(self) -> None:
        """Stop serving and flush the trace (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        await self.runner.cleanup()
        if self._trace_file is not None:
            self._trace_file.close()
            self._trace_file = None

    async def __aenter__(self) -> "Gateway":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def start_gateway(endpoints_path: str | Path, trace_path: str | Path | None = None, host: str = "127.0.0.1",
                        port: int = 0, time_scale: float | None = None, *, connect_timeout_s: float = 5.0,
                        watch_interval_s: float = 0.2, shutdown_timeout_s: float = 30.0, down_for_s: float = 1.0,
                        hold_s: float = DEFAULT_HOLD_S) -> Gateway:
    """Load the endpoints file and serve; time_scale None takes the file's, else 1.0. Port 0 picks a free one.

    `close()` lets calls in flight finish for up to `shutdown_timeout_s`."""
    watcher = EndpointsWatcher(endpoints_path, min_interval_s=watch_interval_s)
    eps = watcher.load()
    scale = time_scale if time_scale is not None else (eps.time_scale or 1.0)
    trace_file: IO[str] | None = None
    writer = None
    if trace_path is not None:
        try:
            trace_file = open(trace_path, "a", encoding="utf-8")
        except OSError as exc:
            raise ScepsyError(f"{trace_path}: cannot open the trace file for append: {exc.strerror}") from None
        writer = TraceWriter(trace_file)
    app = make_app(watcher, writer, scale, connect_timeout_s=connect_timeout_s, down_for_s=down_for_s, hold_s=hold_s)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout_s)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if trace_file is not None:
            trace_file.close()
        raise ScepsyError(f"gateway cannot listen on {host}:{port}: {_bind_reason(exc)}") from None
    bound = runner.addresses[0][1] if runner.addresses else port  # the real port when port=0
    return Gateway(runner, host, bound, trace_file)


def _bind_reason(exc: OSError) -> str:
    """Why binding failed, in a few words (asyncio wraps the errno in a long sentence with the address)."""
    if isinstance(exc.errno, int) and exc.errno > 0:
        reason = os.strerror(exc.errno).lower()
        if exc.errno == errno.EADDRINUSE:
            reason += " (another process listens there: stop it or choose another --port)"
        return reason
    return exc.strerror or str(exc)  # e.g. a host name that does not resolve


def _write_pid_file(path: Path) -> None:
    try:
        write_atomic(path, f"{os.getpid()}\n")
    except OSError as exc:
        raise ScepsyError(f"{path}: cannot write the pid file: {exc.strerror or exc}") from None


def _remove_pid_file(path: Path) -> None:
    """Remove the pid file if it still names this process (a successor may have replaced it)."""
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


async def _serve(endpoints_path: str | Path, trace_path: str | Path | None, host: str, port: int,
                 time_scale: float | None, pid_file: str | Path | None = None, hold_s: float = DEFAULT_HOLD_S) -> None:
    gw = await start_gateway(endpoints_path, trace_path, host, port, time_scale, hold_s=hold_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    st = gw.state
    try:
        if pid_file is not None:  # after binding, so a pid file means the port answers
            _write_pid_file(Path(pid_file))
        log.info("gateway serving %s on %s/v1 (time scale %g)%s", listing(st.router.names()), gw.url,
                 st.time_scale, f", tracing to {trace_path}" if trace_path else "")
        await stop.wait()
    finally:
        await gw.close()
        if pid_file is not None:
            _remove_pid_file(Path(pid_file))
        log.info("gateway stopped")


def run_gateway(endpoints_path: str | Path, trace_path: str | Path | None = None, host: str = "127.0.0.1",
                port: int = 8000, time_scale: float | None = None, *, pid_file: str | Path | None = None,
                hold_s: float = DEFAULT_HOLD_S) -> None:
    """Serve until SIGINT/SIGTERM (blocking); `pid_file` holds this process's id while the port is bound."""
    asyncio.run(_serve(endpoints_path, trace_path, host, port, time_scale, pid_file, hold_s))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The gateway's command-line options (also used by `scepsy gateway`)."""
    p = parser or argparse.ArgumentParser(
        prog="scepsy gateway",
        description="OpenAI-compatible gateway for the LLMs of one or more deployments; traces every call.")
    p.add_argument("--endpoints", required=True, help="endpoints file (YAML or JSON); reloaded when it changes")
    p.add_argument("--trace", default=None, help="append call and span records to this JSONL file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--time-scale", type=float, default=None,
                   help="the engines' time scale, so trace times are model seconds (default: the file's, else 1)")
    p.add_argument("--hold-s", type=float, default=DEFAULT_HOLD_S,
                   help="seconds a call waits for a replica of its LLM when none can take it (engines restarting, "
                        f"a cut-over) before failing with 503 (default {DEFAULT_HOLD_S:g}; 0 fails at once)")
    p.add_argument("--pid-file", default=None,
                   help="write this process's id here once the port is bound; removed on a clean exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log reloads and debug detail")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m scepsy_hpc.gateway`; returns the exit status."""
    args = build_parser().parse_args(argv)

    def serve() -> None:
        if args.time_scale is not None and args.time_scale <= 0:
            raise SpecError(f"--time-scale {args.time_scale:g}: the time scale must be positive")
        if not 0 <= args.hold_s < float("inf"):
            raise SpecError(f"--hold-s {args.hold_s:g}: give 0 (fail at once) or a finite number of seconds")
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run_gateway(args.endpoints, args.trace, args.host, args.port, args.time_scale, pid_file=args.pid_file,
                    hold_s=args.hold_s)

    return run_entry(serve)
