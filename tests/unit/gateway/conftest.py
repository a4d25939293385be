"""Gateway test kit: fake engines in the test's own loop, and a gateway stack (`async def` tests run
under pytest-asyncio, `asyncio_mode = "auto"` in pyproject.toml; each module bounds them with
pytest-timeout's `pytestmark`, so a hang fails in seconds instead of blocking the suite).

The fake engine answers like an OpenAI server and lets a test hold calls open (`gate`), release a
stream chunk by chunk (`chunk_gate`), fail with a 4xx/5xx, or cut the connection mid-answer.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import openai
import pytest
from aiohttp import web

from scepsy_hpc.gateway import Gateway, start_gateway
from scepsy_hpc.trace.records import Trace, read_trace

# The gateway's hold in tests: long enough to see calls held, short enough that a hold that runs out
# costs a test little (the real default is 60 s).
HOLD_S = 0.5


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for a condition that no event signals (gateway-internal state), checking every loop turn."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


def dead_url() -> str:
    """A URL where nothing listens (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@dataclass
class Seen:
    """A call as the fake engine received it."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class FakeEngine:
    """An OpenAI-ish engine; `fault` is None, 'http500', 'http400', 'cut' (connection closed mid-answer) or
    'cut-first' (a stream closed after its headers, before its first event; 'cut-first-once': the next one)."""

    name: str
    tokens: list[str] = field(default_factory=lambda: ["Hel", "lo", " world"])
    fault: str | None = None
    calls: list[Seen] = field(default_factory=list)
    url: str = ""
    active: int = 0

    def __post_init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.chunk_gate: asyncio.Semaphore | None = None
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_calls(self, n: int) -> None:
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.calls) >= n)

    def _usage(self, body: dict[str, Any]) -> dict[str, int]:
        return {"prompt_tokens": 7, "completion_tokens": len(self.tokens), "total_tokens": 7 + len(self.tokens)}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        async with self._arrived:
            self.calls.append(Seen(request.path, body, dict(request.headers)))
            self._arrived.notify_all()
        self.active += 1
        try:
            await self.gate.wait()
            return await self._answer(request, body)
        finally:
            self.active -= 1

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if self.fault == "http500":
            return web.json_response({"error": {"message": "CUDA out of memory", "type": "InternalServerError", "code": 500}},
                                     status=500)
        if self.fault == "http400":
            return web.json_response({"object": "error", "message": "max_tokens is too large", "type": "BadRequestError",
                                      "code": 400}, status=400)
        chat = request.path.endswith("/chat/completions")
        head = {"id": f"cmpl-{self.name}", "created": 0, "model": body.get("model")}
        if not body.get("stream"):
            text = "".join(self.tokens)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} if chat
                      else {"index": 0, "text": text, "finish_reason": "stop"})
            doc = {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                   "usage": self._usage(body), "served_by": self.name}
            if self.fault == "cut":
                resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "4096"})
                await resp.prepare(request)
                await resp.write(json.dumps(doc).encode()[:20])
                assert request.transport is not None
                request.transport.close()
                return resp
            return web.json_response(doc)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        obj = "chat.completion.chunk" if chat else "text_completion"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.fault in ("cut-first", "cut-first-once"):   # the 200 and headers, then the connection closes
            self.fault = None if self.fault == "cut-first-once" else self.fault
            assert request.transport is not None
            request.transport.close()
            return resp

        async def send(choices: list[dict[str, Any]], usage: Any = None) -> None:
            chunk = {**head, "object": obj, "choices": choices}
            if include_usage:
                chunk["usage"] = usage
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        if chat:
            await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for i, tok in enumerate(self.tokens):
            if self.chunk_gate is not None:
                await self.chunk_gate.acquire()
            if self.fault == "cut" and i == 2:
                assert request.transport is not None
                request.transport.close()
                return resp
            last = "stop" if i == len(self.tokens) - 1 else None
            await send([{"index": 0, "delta": {"content": tok}, "finish_reason": last} if chat
                        else {"index": 0, "text": tok, "finish_reason": last}])
        if include_usage:
            await send([], self._usage(body))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class Stack:
    """Fake engines per LLM plus a gateway in front of them, with an endpoints file and a trace file."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.engines: dict[str, list[FakeEngine]] = {}
        self.endpoints_path = tmp / "endpoints.yaml"
        self.trace_path = tmp / "trace.jsonl"
        self.gw: Gateway | None = None
        self.http: aiohttp.ClientSession | None = None

    until = staticmethod(until)
    sse_events = staticmethod(lambda resp: sse_events(resp))

    def write_endpoints(self, text: str) -> None:
        self.endpoints_path.write_text(text)

    @property
    def url(self) -> str:
        assert self.gw is not None
        return self.gw.url

    def client(self, base: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=(base or self.url) + "/v1", api_key="test", max_retries=0,
                                  http_client=openai.DefaultAsyncHttpxClient(trust_env=False))

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """POST JSON (or raw bytes) to the gateway; returns (status, parsed JSON body)."""
        assert self.http is not None
        kw: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with self.http.post(self.url + path, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def get(self, path: str) -> tuple[int, str]:
        assert self.http is not None
        async with self.http.get(self.url + path) as r:
            return r.status, await r.text()

    async def close_gateway(self) -> Trace:
        """Stop the gateway (flushing the trace) and read the trace back."""
        assert self.gw is not None
        await self.gw.close()
        return read_trace(self.trace_path)

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.gw is not None:
            await self.gw.close()  # idempotent
        for engines in self.engines.values():
            for e in engines:
                await e.close()


class _StackFactory:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def __call__(self, llms: dict[str, int], *, caps: dict[str, int] | None = None, dead: dict[str, int] | None = None,
                 served: dict[str, str] | None = None, aliases: dict[str, list[str]] | None = None,
                 time_scale: float = 1.0, hold_s: float = HOLD_S, down_for_s: float = 1.0) -> "_StackCM":
        return _StackCM(self.tmp, llms, caps or {}, dead or {}, served or {}, aliases or {}, time_scale, hold_s,
                        down_for_s)


class _StackCM:
    def __init__(self, tmp: Path, llms: dict[str, int], caps: dict[str, int], dead: dict[str, int],
                 served: dict[str, str], aliases: dict[str, list[str]], time_scale: float, hold_s: float,
                 down_for_s: float) -> None:
        self.stack = Stack(tmp)
        self.args = (llms, caps, dead, served, aliases, time_scale)
        self.hold_s, self.down_for_s = hold_s, down_for_s

    async def __aenter__(self) -> Stack:
        llms, caps, dead, served, aliases, time_scale = self.args
        s = self.stack
        lines = [f"time_scale: {time_scale}", "llms:" if llms else "llms: {}"]
        for name, n in llms.items():
            s.engines[name] = [FakeEngine(f"{name}-{i}") for i in range(n)]  # name: an LLM key, e.g. "dep/planner"
            urls = [dead_url() for _ in range(dead.get(name, 0))] + [await e.start() for e in s.engines[name]]
            lines.append(f"  {name}:")
            if name in served:
                lines.append(f"    served_model: {served[name]}")
            if name in caps:
                lines.append(f"    max_outstanding: {caps[name]}")
            if name in aliases:
                lines.append(f"    aliases: [{', '.join(aliases[name])}]")
            lines.append("    replicas:" if urls else "    replicas: []")
            lines += [f"      - {u}" for u in urls]
        s.write_endpoints("\n".join(lines) + "\n")
        s.gw = await start_gateway(s.endpoints_path, s.trace_path, watch_interval_s=0.0, shutdown_timeout_s=1.0,
                                   hold_s=self.hold_s, down_for_s=self.down_for_s)
        s.http = aiohttp.ClientSession(trust_env=False)
        return s

    async def __aexit__(self, *exc: object) -> None:
        await self.stack.aclose()


@pytest.fixture
def stack(tmp_path: Path) -> _StackFactory:
    """`async with stack({"planner": 2}) as s:` starts fake engines and a gateway over them."""
    return _StackFactory(tmp_path)


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The `data:` payloads of an SSE response, as they arrive."""
    buf = b""
    async for data in resp.content.iter_any():
        buf += data
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    yield line[6:]
