"""What every request passes before a handler: client keys, per-key limits, and bounded reading.

`guard` is the gateway app's middleware: it answers every HTTP error as OpenAI-style JSON,
checks the client key (`auth.py`) on every route but `/health`, admits LLM calls within their
key's limits, and reads the body before the handler with a size bound (413) and a time bound (408),
so a handler never waits on a slow client. `GuardedRunner` does the same for what aiohttp answers
itself, before any handler: a malformed request line or header, a line over the size limit, a bad
method. A client that goes away costs one log line, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from scepsy_hpc.gateway.auth import Denial
from scepsy_hpc.gateway.endpoints import ClientKey
from scepsy_hpc.gateway.proxy import error_json, error_response

if TYPE_CHECKING:
    from scepsy_hpc.gateway.app import GatewayState

log = logging.getLogger("scepsy_hpc.gateway")

CLIENT_KEY = web.RequestKey("scepsy_client_key", ClientKey)
# aiohttp's defaults, named here because messages quote them: a request line (the URL) and a header line.
MAX_LINE_BYTES = 8190
MAX_HEADER_BYTES = 8190
MAX_HEADERS = 128
OPEN_PATHS = frozenset({"/health"})
# Bodies of routes other than LLM calls (span events) are small.
SMALL_BODY_BYTES = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def denial_response(d: Denial) -> web.Response:
    """The client's response to a refused key or limit."""
    return error_response(d.status, d.message, d.type, d.code, headers=d.headers())


def _closing(resp: web.Response) -> web.Response:
    resp.force_close()   # the rest of the request (a body not read) must not be taken for the next one
    return resp


def _http_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's own text/plain error (404, 405, 413, ...) as OpenAI-style JSON."""
    status = exc.status
    if status == 404:
        msg, code = "no such route; the gateway serves /v1/chat/completions, /v1/completions, /v1/models, /health", \
            "route_not_found"
    elif status == 405:
        allowed = exc.headers.get("Allow", "")
        msg, code = f"method not allowed here; allowed: {allowed or '(none)'}", "method_not_allowed"
    else:
        msg, code = exc.reason or "request refused", "invalid_request"
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return error_response(status, msg, "invalid_request_error", code, headers=headers or None)


def guard(state_key: web.AppKey[GatewayState]) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The gateway's middleware (the app's state under `state_key`)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        st = request.app[state_key]
        try:
            if request.match_info.http_exception is not None:
                raise request.match_info.http_exception
            st.sync()
            key: ClientKey | None = None
            if st.keys.enabled and request.path not in OPEN_PATHS:
                got = st.keys.authenticate(request.headers.getall("Authorization", []))
                if isinstance(got, Denial):
                    return denial_response(got)
                key = request[CLIENT_KEY] = got
            if key is not None and request.match_info.route in st.call_routes:
                denied = st.keys.admit(key)
                if denied is not None:
                    return _closing(denial_response(denied)) if request.body_exists else denial_response(denied)
                try:
                    return await _read_then(st, request, handler)
                finally:
                    st.keys.release(key)
            return await _read_then(st, request, handler)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _http_error(exc)

    return middleware


async def _read_then(st: GatewayState, request: web.Request, handler: Handler) -> web.StreamResponse:
    refusal = await read_body(st, request)
    if refusal is not None:
        return refusal
    return await handler(request)


async def read_body(st: GatewayState, request: web.Request) -> web.Response | None:
    """Read the body now, within the size and time bounds (None), or the refusal (413, 408, client gone)."""
    if not request.body_exists:
        return None
    limit = st.max_body_bytes if request.match_info.route in st.call_routes else SMALL_BODY_BYTES
    if request.content_length is not None and request.content_length > limit:
        st.refused("body_too_large")
        return _closing(too_large(request.content_length, limit))
    try:
        await asyncio.wait_for(request.read(), st.client_timeout_s)
    except asyncio.TimeoutError:
        st.refused("client_timeout")
        log.info("client %s sent too slowly: %s %s cut after %g s without its whole body", request.remote,
                 request.method, request.path, st.client_timeout_s)
        return await _answer_and_close(request, error_response(
            408, f"the request body did not arrive within {st.client_timeout_s:g} s; send it at once (the limit is "
            "--client-timeout-s)", "invalid_request_error", "request_timeout"))
    except web.HTTPRequestEntityTooLarge:
        st.refused("body_too_large")
        return _closing(too_large(None, limit))
    except ConnectionError as exc:   # the client went away mid-body (its answer goes nowhere)
        st.refused("client_aborted")
        log.info("client %s went away during %s %s before sending its whole body (%s)", request.remote,
                 request.method, request.path, type(exc).__name__)
        return _closing(error_response(400, "the request body was cut off", "invalid_request_error",
                                       "incomplete_body"))
    except (RequestPayloadError, http_exceptions.HttpProcessingError) as exc:
        # a bad chunked or content encoding (a gzip body that is not gzip)
        st.refused("bad_body_encoding")
        log.info("client %s sent a body that cannot be decoded: %s %s (%s)", request.remote, request.method,
                 request.path, type(exc).__name__)
        return _closing(error_response(400, "the request body cannot be decoded (its Transfer-Encoding or "
                                       "Content-Encoding is broken)", "invalid_request_error", "invalid_body"))
    return None


async def _answer_and_close(request: web.Request, resp: web.Response) -> web.Response:
    """Send `resp` and close the connection now: a stalled client gets no lingering time to finish its body."""
    resp.force_close()
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except ConnectionError:
        pass
    if request.transport is not None:
        request.transport.close()   # after the answer: close() flushes what is buffered first
    return resp


def too_large(got: int | None, limit: int) -> web.Response:
    """The 413 for a body over `limit` bytes (`got`: its size when known)."""
    if limit < 2**20:   # a span event: its limit is fixed
        return error_response(413, f"the request body is larger than {limit // 1024} KiB, the limit of this route (a "
                              "span event names a request and a tool: keep names and errors short)",
                              "invalid_request_error", "request_too_large")
    size = f" ({got / 2**20:.1f} MiB)" if got is not None else ""
    return error_response(413, f"the request body{size} is larger than the gateway's limit of {limit / 2**20:g} MiB; "
                          "send less, or start the gateway with a larger --max-body-mib", "invalid_request_error",
                          "request_too_large")


# -- errors aiohttp answers before any handler -----------------------------------------------------------------

_PROTOCOL_PROBLEMS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong, f"the URL or a header line is too long (each is limited to {MAX_LINE_BYTES} bytes)"),
    (http_exceptions.BadHttpMethod, "the HTTP method is not valid"),
    (http_exceptions.InvalidURLError, "the URL is not valid"),
    (http_exceptions.InvalidHeader, "a header is malformed"),
    (http_exceptions.BadStatusLine, "the request line is malformed"),
    (http_exceptions.TransferEncodingError, "the transfer encoding is malformed"),
    (http_exceptions.ContentLengthError, "the Content-Length does not match the body"),
    (http_exceptions.PayloadEncodingError, "the body's encoding is malformed"),
)


def _protocol_problem(exc: BaseException | None) -> str:
    # Never the exception's own text: it may quote the offending header, an Authorization key among them.
    for cls, what in _PROTOCOL_PROBLEMS:
        if isinstance(exc, cls):
            return what
    if exc is not None and "header" in str(exc).lower() and "too many" in str(exc).lower():
        return f"too many headers (at most {MAX_HEADERS})"
    return "the request is not valid HTTP"


# What a client's connection or body can raise where aiohttp logs it: one line, not a traceback.
_CLIENT_FAULTS = (ConnectionError, RequestPayloadError, http_exceptions.HttpProcessingError)


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors as OpenAI-style JSON with one log line."""

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """One line for a client's fault (a body still arriving after the answer turns out broken); else as aiohttp."""
        exc = kw.get("exc_info")
        if isinstance(exc, _CLIENT_FAULTS):
            self.logger.info("client connection ended: %s", type(exc).__name__)
            return
        super().log_exception(*args, **kw)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """The response to a request aiohttp could not parse, or a handler's unexpected exception."""
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if status < 500 or isinstance(exc, ConnectionError):
            what = _protocol_problem(exc) if status < 500 else "connection lost"
            self.logger.info("client %s: %s (answered %d)", request.remote, what, status)
            body = error_json(f"{what}; send a well-formed HTTP/1.1 request", "invalid_request_error",
                              "invalid_http_request")
        else:   # a bug of the gateway's: keep its traceback
            self.logger.error("gateway error handling a request from %s", request.remote, exc_info=exc)
            body = error_json("gateway error (see the gateway's log)", "gateway_error", status)
        resp = web.Response(status=status, body=body, content_type="application/json")
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    """An aiohttp server whose connections answer their own errors as JSON."""

    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server answers malformed HTTP with JSON errors and one log line each."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer   # same object and state: only its connection handler class changes
        return server

