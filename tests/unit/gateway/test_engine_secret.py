"""The engine's secret: every call to a replica with an `api_key` carries `Authorization: Bearer <api_key>`,
whatever the client sent; the secret follows the endpoints file and shows in no repr, log line or trace."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from scepsy_hpc.gateway import start_gateway
from scepsy_hpc.gateway.endpoints import load_endpoints

pytestmark = pytest.mark.timeout(10)

SECRET = "engine-secret-1f2e3d"
CLIENT_KEY = "sk-scepsy-abcdef12-" + "t" * 43
SHA = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()


class Recorder:
    """An engine that records the Authorization header of each call (None when absent)."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self.fail = False
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.headers.get("Authorization"))
        body = await request.json()
        if self.fail:
            return web.json_response({"error": {"message": "boom", "type": "InternalServerError"}}, status=500)
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'data: {"choices": [{"index": 0, "text": "hi"}]}\n\n'
                             b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}\n\n'
                             b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return web.json_response({"choices": [{"index": 0, "text": "hi"}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def engine() -> AsyncIterator[Recorder]:
    e = Recorder()
    await e.start()
    yield e
    await e.close()


def _endpoints(url: str, api_key: str | None, *, auth: bool) -> str:
    rep = f"{{url: {url}, api_key: {api_key}}}" if api_key else url
    keys = f"auth:\n  keys:\n    - {{id: abcdef12, sha256: {SHA}, deployments: ['*']}}\n" if auth else ""
    return f"{keys}llms:\n  m:\n    replicas: [{rep}]\n"


async def _call(http: aiohttp.ClientSession, url: str, auth: str | None, **extra: Any) -> tuple[int, bytes]:
    headers = {"Authorization": auth} if auth is not None else {}
    async with http.post(url + "/v1/completions", json={"model": "m", "prompt": "x", **extra}, headers=headers) as r:
        return r.status, await r.read()


async def test_the_replica_secret_replaces_the_clients_authorization_and_follows_reloads(
        engine: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ep, trace = tmp_path / "endpoints.yaml", tmp_path / "trace.jsonl"
    ep.write_text(_endpoints(engine.url, SECRET, auth=True))
    gw = await start_gateway(ep, trace, watch_interval_s=0.0, shutdown_timeout_s=1.0, hold_s=0.0)
    try:
        async with aiohttp.ClientSession(trust_env=False) as http:
            unary = await _call(http, gw.url, f"Bearer {CLIENT_KEY}")
            streamed = await _call(http, gw.url, f"Bearer {CLIENT_KEY}", stream=True)
            engine.fail = True   # an engine error: its message reaches the client and the trace, the secret does not
            failed = await _call(http, gw.url, f"Bearer {CLIENT_KEY}")
            engine.fail = False
            ep.write_text(_endpoints(engine.url, "rotated-secret", auth=True))
            after = await _call(http, gw.url, f"Bearer {CLIENT_KEY}")
            states = repr(gw.state.router.pools())
    finally:
        await gw.close()
    assert (unary[0], streamed[0], failed[0], after[0]) == (200, 200, 500, 200)
    assert b"[DONE]" in streamed[1]
    # one replica, so the 500 is not retried elsewhere; the reload takes effect for the next call
    assert engine.seen == [f"Bearer {SECRET}"] * 3 + ["Bearer rotated-secret"]
    text = trace.read_text()
    assert len([json.loads(line) for line in text.splitlines()]) == 5   # meta + 4 calls
    for where in (text, states, caplog.text, failed[1].decode(),
                  repr(load_endpoints(ep).llms["m"].replicas[0])):
        assert SECRET not in where and "rotated-secret" not in where and CLIENT_KEY not in where


async def test_without_a_secret_the_clients_authorization_goes_on_only_when_no_client_keys_are_checked(
        engine: Recorder, tmp_path: Path) -> None:
    ep = tmp_path / "endpoints.yaml"
    ep.write_text(_endpoints(engine.url, None, auth=True))
    gw = await start_gateway(ep, None, watch_interval_s=0.0, shutdown_timeout_s=1.0, hold_s=0.0)
    try:
        async with aiohttp.ClientSession(trust_env=False) as http:
            keyed = await _call(http, gw.url, f"Bearer {CLIENT_KEY}")
            ep.write_text(_endpoints(engine.url, None, auth=False))   # a hand-run gateway: no client keys
            open_ = await _call(http, gw.url, "Bearer the-engines-own-key")
            bare = await _call(http, gw.url, None)
    finally:
        await gw.close()
    assert (keyed[0], open_[0], bare[0]) == (200, 200, 200)
    assert engine.seen == [None, "Bearer the-engines-own-key", None]
