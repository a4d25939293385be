"""A hostile HTTP corpus against the gateway: every malformed request gets an OpenAI-style JSON 4xx within
5 s, nothing reaches an engine, no traceback reaches a response or the log, and the gateway stays healthy."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import time
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(20)

KEY = "sk-scepsy-0a0a0a0a-" + "K" * 43
CHAT = [{"role": "user", "content": "hi"}]
GOOD = {"model": "demo/planner", "messages": CHAT}
CHAT_PATH = "/v1/chat/completions"


def raw(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, *,
        key: bool = True, length: bool = True) -> bytes:
    """A request as bytes (Connection: close), with the valid key unless `key` is False."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gw", "Connection: close"]
    if key:
        lines.append(f"Authorization: Bearer {KEY}")
    if length:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def post(body: Any, path: str = CHAT_PATH, **kw: Any) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return raw("POST", path, data, {"Content-Type": "application/json"}, **kw)


def deep(n: int) -> bytes:
    return b'{"model": "demo/planner", "messages": ' + b"[" * n + b"]" * n + b"}"


def chunked(body: bytes, chunk: int = 1 << 20) -> bytes:
    head = (f"POST {CHAT_PATH} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    parts = [f"{len(body[i:i + chunk]):x}\r\n".encode() + body[i:i + chunk] + b"\r\n" for i in range(0, len(body), chunk)]
    return head + b"".join(parts) + b"0\r\n\r\n"


# (name, bytes sent, expected status or None for any 4xx)
CORPUS: list[tuple[str, bytes, int | None]] = [
    # bodies that are not a JSON object
    ("not json", post(b"{not json"), 400),
    ("empty body", post(b""), 400),
    ("json array", post([1, 2]), 400),
    ("json string", post("hello"), 400),
    ("json number", post(3), 400),
    ("json null", post(None), 400),
    ("trailing garbage", post(json.dumps(GOOD).encode() + b" x"), 400),
    ("invalid utf-8", post(b'{"model": "\xff\xfe"}'), 400),
    ("raw NUL byte in body", post(b'{"model": "demo/planner\x00", "messages": []}'), 400),
    ("deep arrays 100k", post(deep(100_000)), 400),
    ("deep objects 50k", post(b'{"a":' * 50_000 + b"1" + b"}" * 50_000), 400),
    ("lone surrogate escape", post(b'{"model": "\\ud800", "messages": 5}'), 400),
    # wrong types for model, messages, prompt, stream
    ("model int", post({**GOOD, "model": 7}), 400),
    ("model null", post({**GOOD, "model": None}), 400),
    ("model list", post({**GOOD, "model": ["demo/planner"]}), 400),
    ("model empty", post({**GOOD, "model": ""}), 400),
    ("model unknown", post({**GOOD, "model": "nope"}), 404),
    ("model 10k chars", post({**GOOD, "model": "m" * 10_000}), 404),
    ("messages string", post({**GOOD, "messages": "hi"}), 400),
    ("messages empty", post({**GOOD, "messages": []}), 400),
    ("messages ints", post({**GOOD, "messages": [1, 2]}), 400),
    ("messages missing", post({"model": "demo/planner"}), 400),
    ("stream string", post({**GOOD, "stream": "yes"}), 400),
    ("stream int", post({**GOOD, "stream": 1}), 400),
    ("prompt missing", post({"model": "demo/planner"}, "/v1/completions"), 400),
    ("prompt int", post({"model": "demo/planner", "prompt": 5}, "/v1/completions"), 400),
    # sizes
    ("50 MB body", post(b"{" + b" " * (50 * 2**20) + b"}"), 413),
    ("9 MiB chunked body", chunked(b'{"model": "' + b"x" * (9 * 2**20) + b'"}'), 413),
    ("gzip bomb", raw("POST", CHAT_PATH, gzip.compress(b" " * (20 * 2**20)),
                      {"Content-Encoding": "gzip", "Content-Type": "application/json"}), None),
    ("bad gzip", raw("POST", CHAT_PATH, b"not gzip at all", {"Content-Encoding": "gzip"}), None),
    ("span event 100 KiB", post({"span": "tool", "event": "start", "request": "r" * 100_000}, "/scepsy/v1/spans"), 413),
    ("span name 600 chars", post({"span": "tool", "event": "start", "request": "r", "name": "n" * 600},
                                 "/scepsy/v1/spans"), 400),
    ("span bad json", post(b"{", "/scepsy/v1/spans"), 400),
    ("span deep json", post(b"[" * 30_000 + b"]" * 30_000, "/scepsy/v1/spans"), 400),
    ("span end never started", post({"span": "tool", "event": "end", "request": "r"}, "/scepsy/v1/spans"), 400),
    # HTTP itself
    ("URL 20k", raw("GET", "/v1/models?" + "q" * 20_000), 400),
    ("header 20k", raw("GET", "/v1/models", headers={"X-Big": "h" * 20_000}), 400),
    ("200 headers", raw("GET", "/v1/models", headers={f"X-H{i}": "v" for i in range(200)}), 400),
    ("bad method token", raw("G@T", "/v1/models"), 400),
    ("unknown method", raw("BREW", CHAT_PATH), 400),
    ("GET on a POST route", raw("GET", CHAT_PATH), 404),
    ("DELETE /health", raw("DELETE", "/health", key=False), 405),
    ("no such route", raw("GET", "/nope"), 404),
    ("embeddings not served", post({"model": "demo/planner", "input": "x"}, "/v1/embeddings"), 404),
    ("NUL in URL", b"GET /v1/mo\x00dels HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", 400),
    ("NUL in header", b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-A: b\x00c\r\nConnection: close\r\n\r\n", 400),
    ("header without colon", b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nnocolon\r\nConnection: close\r\n\r\n", 400),
    ("content-length abc", raw("POST", CHAT_PATH, b"{}", {"Content-Length": "abc"}, length=False), 400),
    ("content-length negative", raw("POST", CHAT_PATH, b"{}", {"Content-Length": "-5"}, length=False), 400),
    ("length and chunked", raw("POST", CHAT_PATH, b"0\r\n\r\n", {"Transfer-Encoding": "chunked"}), 400),
    ("bad chunk size", raw("POST", CHAT_PATH, b"zz\r\n{}\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"},
                           length=False), 400),
    ("not HTTP at all", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n", 400),
    # content types
    ("form body", raw("POST", CHAT_PATH, b"model=demo/planner&messages=hi",
                      {"Content-Type": "application/x-www-form-urlencoded"}), 400),
    ("multipart body", raw("POST", CHAT_PATH, b"--b\r\nContent-Disposition: form-data; name=model\r\n\r\nx\r\n--b--",
                           {"Content-Type": "multipart/form-data; boundary=b"}), 400),
    ("text/plain not json", raw("POST", CHAT_PATH, b"hello", {"Content-Type": "text/plain"}), 400),
    # Authorization forms
    ("no key", post(GOOD, key=False), 401),
    ("Basic auth", raw("POST", CHAT_PATH, json.dumps(GOOD).encode(), {"Authorization": "Basic dXNlcjpwYXNz"},
                       key=False), 401),
    ("Bearer without key", raw("POST", CHAT_PATH, json.dumps(GOOD).encode(), {"Authorization": "Bearer"},
                               key=False), 401),
    ("Bearer two tokens", raw("POST", CHAT_PATH, json.dumps(GOOD).encode(), {"Authorization": f"Bearer {KEY} x"},
                              key=False), 401),
    ("wrong key", raw("POST", CHAT_PATH, json.dumps(GOOD).encode(), {"Authorization": f"Bearer {KEY}x"},
                      key=False), 401),
    ("key hash as key", raw("POST", CHAT_PATH, json.dumps(GOOD).encode(),
                            {"Authorization": "Bearer " + hashlib.sha256(KEY.encode()).hexdigest()}, key=False), 401),
    ("non-ascii key", raw("POST", CHAT_PATH, json.dumps(GOOD).encode(), {"Authorization": "Bearer клю\udcff"},
                          key=False), 401),
    ("key 20k long", raw("POST", CHAT_PATH, json.dumps(GOOD).encode(), {"Authorization": "Bearer " + "k" * 20_000},
                         key=False), 400),
    ("two Authorization headers", raw("POST", CHAT_PATH, json.dumps(GOOD).encode(),
                                      {"Authorization": "Bearer nope"}), 401),
]


async def exchange(url: str, data: bytes, *, timeout_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the answer to EOF; (status, headers, body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        try:
            await writer.drain()
        except ConnectionError:
            pass   # the gateway answered (413) and closed before reading all of it
        answer = await asyncio.wait_for(_read_all(reader), timeout_s)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines if ":" in h)}
    return int(status_line.split()[1]), headers, body


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    out = b""
    try:
        while chunk := await reader.read(65536):
            out += chunk
    except ConnectionError:
        pass
    return out


def assert_openai_error(name: str, status: int, headers: dict[str, str], body: bytes, expected: int | None) -> None:
    assert 400 <= status < 500, f"{name}: HTTP {status}: {body[:300]!r}"
    if expected is not None:
        assert status == expected, f"{name}: HTTP {status}, expected {expected}: {body[:300]!r}"
    assert headers.get("content-type", "").startswith("application/json"), f"{name}: {headers}"
    err = json.loads(body)["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err and "code" in err, name
    assert b"Traceback" not in body and KEY.encode() not in body, name


@pytest.fixture
async def guarded(stack: Any) -> Any:
    async with stack({"demo/planner": 1}) as s:
        base = s.endpoints_path.read_text()
        s.write_endpoints(base + "auth:\n  keys:\n    - {id: 0a0a0a0a, sha256: "
                          f"{hashlib.sha256(KEY.encode()).hexdigest()}, deployments: [demo]}}\n")
        yield s


async def test_every_malformed_request_gets_a_json_4xx_quickly_and_the_gateway_stays_healthy(
        guarded: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = guarded
    assert len(CORPUS) >= 40
    slowest = 0.0
    for name, data, expected in CORPUS:
        t0 = time.monotonic()
        status, headers, body = await exchange(s.url, data)
        slowest = max(slowest, time.monotonic() - t0)
        assert_openai_error(name, status, headers, body, expected)
        health, _ = await s.get("/health")
        assert health == 200, f"unhealthy after {name}"
    ok, _ = await s.post(CHAT_PATH, GOOD, headers={"Authorization": f"Bearer {KEY}"})
    assert ok == 200 and len(s.engines["demo/planner"][0].calls) == 1   # none of the corpus reached the engine
    assert slowest < 5.0
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "Traceback" not in caplog.text and KEY not in caplog.text
    print(f"\n{len(CORPUS)} hostile requests, each a JSON 4xx; slowest {slowest * 1e3:.0f} ms")


async def test_a_slow_body_is_cut_with_408_and_clients_gone_mid_body_cost_one_line_each(
        guarded: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = guarded
    s.gw.state.client_timeout_s = 0.3
    head = (f"POST {CHAT_PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 1000\r\n"
            "\r\n").encode()
    t0 = time.monotonic()
    status, headers, body = await exchange(s.url, head + b'{"model": "demo')
    waited = time.monotonic() - t0
    assert_openai_error("slow body", status, headers, body, 408)
    assert 0.3 <= waited < 2.0
    n = 20
    for _ in range(n):   # half a body, then the connection is reset
        reader, writer = await asyncio.open_connection(*s.url.removeprefix("http://").rsplit(":", 1))
        writer.write(head + b'{"model": ')
        await writer.drain()
        writer.transport.abort()
    await s.until(lambda: s.gw.state.refusals.get("client_aborted", 0) == n)
    health, _ = await s.get("/health")
    lines = [r for r in caplog.records if "went away" in r.getMessage()]
    assert health == 200 and len(lines) == n and not [r for r in caplog.records if r.exc_info]
    assert s.gw.state.refusals["client_timeout"] == 1 and s.engines["demo/planner"][0].calls == []


async def test_a_closed_stream_and_an_idle_connection_cost_no_traceback(guarded: Any,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = guarded
    engine = s.engines["demo/planner"][0]
    engine.chunk_gate = asyncio.Semaphore(1)
    reader, writer = await asyncio.open_connection(*s.url.removeprefix("http://").rsplit(":", 1))
    writer.write(post({**GOOD, "stream": True}))
    await writer.drain()
    await reader.readuntil(b"data: ")   # the stream began
    writer.transport.abort()            # the client goes away mid-stream
    for _ in range(5):
        engine.chunk_gate.release()
    await s.until(lambda: engine.active == 0)
    health, _ = await s.get("/health")
    assert health == 200 and not [r for r in caplog.records if r.exc_info]
