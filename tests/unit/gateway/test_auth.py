"""Client keys at the gateway: 401 without a valid key, other deployments' LLMs do not exist for a key,
per-key limits with 429 and Retry-After, and keys never forwarded, logged or traced."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from scepsy_hpc.errors import ScepsyError, SpecError
from scepsy_hpc.gateway import start_gateway
from scepsy_hpc.gateway.auth import KeyRing
from scepsy_hpc.gateway.endpoints import Auth, ClientKey, Endpoints, load_endpoints

pytestmark = pytest.mark.timeout(10)

CHAT = [{"role": "user", "content": "hi"}]
KEY_A = "sk-scepsy-0a0a0a0a-" + "A" * 43
KEY_B = "sk-scepsy-0b0b0b0b-" + "B" * 43
KEY_ALL = "sk-scepsy-0c0c0c0c-" + "C" * 43


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def auth_section(*keys: tuple[str, str, list[str], dict[str, int]]) -> str:
    lines = ["auth:", "  keys:" if keys else "  keys: []"]
    for kid, key, deps, limits in keys:
        extra = "".join(f", {k}: {v}" for k, v in limits.items())
        lines.append(f"    - {{id: {kid}, sha256: {sha(key)}, deployments: {json.dumps(deps)}{extra}}}")
    return "\n".join(lines) + "\n"


def with_auth(s: Any, *keys: tuple[str, str, list[str], dict[str, int]]) -> None:
    """Add an `auth` section to the stack's endpoints file (the gateway reloads it on the next request)."""
    base = s.endpoints_path.read_text().split("auth:")[0]
    s.write_endpoints(base + auth_section(*keys))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sdk(s: Any, key: str, base: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=(base or s.url) + "/v1", api_key=key, max_retries=0,
                              http_client=openai.DefaultAsyncHttpxClient(trust_env=False))


async def test_no_key_a_malformed_one_and_an_unknown_one_are_401_and_health_stays_open(stack: Any) -> None:
    async with stack({"demo/planner": 1}) as s:
        with_auth(s, ("0a0a0a0a", KEY_A, ["demo"], {}))
        none, none_body = await s.post("/v1/chat/completions", {"model": "demo/planner", "messages": CHAT})
        basic, _ = await s.post("/v1/chat/completions", {"model": "demo/planner", "messages": CHAT},
                                headers={"Authorization": "Basic " + KEY_A})
        wrong, wrong_body = await s.post("/v1/chat/completions", {"model": "demo/planner", "messages": CHAT},
                                         headers=bearer(KEY_A + "x"))
        assert s.http is not None
        async with s.http.get(s.url + "/v1/models") as r:
            models_status, www = r.status, r.headers.get("WWW-Authenticate")
        routes = {}
        for method, path in (("GET", "/scepsy/v1/stats"), ("GET", "/metrics"), ("POST", "/scepsy/v1/spans"),
                             ("GET", "/d/demo/v1/models"), ("POST", "/v1/embeddings")):
            async with s.http.request(method, s.url + path, json={}) as r:
                routes[path] = r.status
        health, _ = await s.get("/health")
        stats_status, stats = await s.post("/scepsy/v1/stats", b"", headers=bearer(KEY_A))   # POST: 405, keyed
        async with s.http.get(s.url + "/scepsy/v1/stats", headers=bearer(KEY_A)) as r:
            stats = await r.json()
        assert s.engines["demo/planner"][0].calls == []
    assert (none, basic, wrong, models_status) == (401, 401, 401, 401) and www is not None
    assert none_body["error"]["code"] == "invalid_api_key" and "scepsy keys show" in none_body["error"]["message"]
    assert "not valid" in wrong_body["error"]["message"] and KEY_A not in str(wrong_body)
    assert set(routes.values()) == {401} and health == 200 and stats_status == 405
    assert stats["auth"]["unauthorized"]["missing"] >= 6 and stats["auth"]["unauthorized"]["malformed"] == 1
    assert stats["auth"]["unauthorized"]["invalid"] == 1


async def test_a_key_calls_only_its_deployments_llms_and_lists_only_them(stack: Any) -> None:
    async with stack({"a/planner": 1, "b/coder": 1}) as s:
        with_auth(s, ("0a0a0a0a", KEY_A, ["a"], {}), ("0c0c0c0c", KEY_ALL, ["*"], {}))
        ok, _ = await s.post("/v1/chat/completions", {"model": "a/planner", "messages": CHAT}, headers=bearer(KEY_A))
        other, other_body = await s.post("/v1/chat/completions", {"model": "b/coder", "messages": CHAT},
                                         headers=bearer(KEY_A))
        scoped, _ = await s.post("/d/b/v1/chat/completions", {"model": "coder", "messages": CHAT},
                                 headers=bearer(KEY_A))
        unknown, unknown_body = await s.post("/v1/chat/completions", {"model": "nope", "messages": CHAT},
                                             headers=bearer(KEY_A))
        listed = [m.id for m in (await sdk(s, KEY_A).models.list()).data]
        listed_all = [m.id for m in (await sdk(s, KEY_ALL).models.list()).data]
        star, _ = await s.post("/v1/chat/completions", {"model": "b/coder", "messages": CHAT}, headers=bearer(KEY_ALL))
        assert s.http is not None
        async with s.http.get(s.url + "/scepsy/v1/stats", headers=bearer(KEY_A)) as r:
            stats = await r.json()
        coder_calls = len(s.engines["b/coder"][0].calls)
    # another deployment's LLM does not exist for this key: 404, as OpenAI answers a model the key may not use
    assert (ok, other, scoped, unknown, star) == (200, 404, 404, 404, 200)
    assert other_body["error"]["code"] == "model_not_found"
    assert "key 0a0a0a0a may not call it" in other_body["error"]["message"]
    assert "coder" not in other_body["error"]["message"].split("may call:")[1].split(".")[0]
    assert "b/coder" not in unknown_body["error"]["message"]   # the listing names only the key's own LLMs
    assert listed == ["a/planner"] and listed_all == ["a/planner", "b/coder"]
    assert coder_calls == 1   # only the "*" key's call reached it
    assert stats["auth"]["per_key"]["0a0a0a0a"]["refused"] == 2


async def test_a_key_removed_from_the_file_is_refused_from_the_next_call(stack: Any) -> None:
    async with stack({"demo/planner": 1}) as s:
        with_auth(s, ("0a0a0a0a", KEY_A, ["demo"], {}), ("0b0b0b0b", KEY_B, ["demo"], {}))
        before, _ = await s.post("/v1/chat/completions", {"model": "demo/planner", "messages": CHAT},
                                 headers=bearer(KEY_B))
        with_auth(s, ("0a0a0a0a", KEY_A, ["demo"], {}))
        after, body = await s.post("/v1/chat/completions", {"model": "demo/planner", "messages": CHAT},
                                   headers=bearer(KEY_B))
        still, _ = await s.post("/v1/chat/completions", {"model": "demo/planner", "messages": CHAT},
                                headers=bearer(KEY_A))
        with_auth(s)   # an auth section without keys: every call is 401
        none_left, _ = await s.post("/v1/chat/completions", {"model": "demo/planner", "messages": CHAT},
                                    headers=bearer(KEY_A))
    assert (before, after, still, none_left) == (200, 401, 200, 401)
    assert body["error"]["code"] == "invalid_api_key" and "revoked" in body["error"]["message"]


async def test_over_max_concurrent_is_429_with_retry_after_and_the_slot_comes_back(stack: Any) -> None:
    async with stack({"demo/planner": 1}) as s:
        with_auth(s, ("0a0a0a0a", KEY_A, ["demo"], {"max_concurrent": 2}), ("0b0b0b0b", KEY_B, ["demo"], {}))
        engine = s.engines["demo/planner"][0]
        engine.gate.clear()
        held = [asyncio.create_task(s.post("/v1/chat/completions", {"model": "demo/planner", "messages": CHAT},
                                           headers=bearer(KEY_A))) for _ in range(2)]
        await engine.wait_calls(2)
        assert s.http is not None
        async with s.http.post(s.url + "/v1/chat/completions", json={"model": "demo/planner", "messages": CHAT},
                               headers=bearer(KEY_A)) as r:
            over, retry_after, over_body = r.status, r.headers.get("Retry-After"), await r.json()
        engine.gate.set()
        done = [st for st, _ in await asyncio.gather(*held)]
        again, _ = await s.post("/v1/chat/completions", {"model": "demo/planner", "messages": CHAT},
                                headers=bearer(KEY_A))
        async with s.http.get(s.url + "/metrics", headers=bearer(KEY_B)) as r:
            metrics = await r.text()
    assert over == 429 and retry_after == "1" and over_body["error"]["code"] == "rate_limit_exceeded"
    assert "max_concurrent 2" in over_body["error"]["message"]
    assert done == [200, 200] and again == 200
    assert 'scepsy_gateway_key_rate_limited_total{key="0a0a0a0a",limit="max_concurrent"} 1.0' in metrics
    assert 'scepsy_gateway_key_in_flight{key="0a0a0a0a"} 0.0' in metrics
    assert KEY_A not in metrics and sha(KEY_A) not in metrics


async def test_over_rpm_is_429_with_the_seconds_until_a_call_is_allowed(stack: Any) -> None:
    async with stack({"demo/planner": 1}) as s:
        with_auth(s, ("0a0a0a0a", KEY_A, ["demo"], {"rpm": 2}), ("0b0b0b0b", KEY_B, ["demo"], {"rpm": 2}))
        statuses = [(await s.post("/v1/completions", {"model": "demo/planner", "prompt": "x"},
                                  headers=bearer(KEY_A)))[0] for _ in range(3)]
        assert s.http is not None
        async with s.http.post(s.url + "/v1/completions", json={"model": "demo/planner", "prompt": "x"},
                               headers=bearer(KEY_A)) as r:
            retry_after, body = r.headers.get("Retry-After"), await r.json()
        other, _ = await s.post("/v1/completions", {"model": "demo/planner", "prompt": "x"}, headers=bearer(KEY_B))
    assert statuses == [200, 200, 429] and other == 200   # limits are per key
    assert retry_after is not None and 1 <= int(retry_after) <= 30   # 2 per minute: a token every 30 s
    assert "2 requests per minute" in body["error"]["message"]


def test_the_rpm_bucket_refills_at_rpm_per_minute_and_a_lowered_rpm_holds_at_once() -> None:
    now = [0.0]
    ring = KeyRing(clock=lambda: now[0])
    key = ClientKey(id="k", sha256=sha("x"), deployments=["*"], rpm=60)
    ring.update(Endpoints(llms={}, auth=Auth(keys=[key])))
    assert all(ring.admit(key) is None for _ in range(60))
    denied = ring.admit(key)
    assert denied is not None and denied.retry_after_s == 1 and denied.headers() == {"Retry-After": "1"}
    now[0] = 1.0
    assert ring.admit(key) is None and ring.admit(key) is not None   # one token a second
    slow = key.model_copy(update={"rpm": 1})
    now[0] = 100.0
    ring.update(Endpoints(llms={}, auth=Auth(keys=[slow])))
    assert ring.admit(slow) is None
    again = ring.admit(slow)
    assert again is not None and again.retry_after_s == 60


async def test_the_openai_sdk_works_with_a_key_streaming_included_and_fails_without(stack: Any, tmp_path: Path,
                                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with stack({"demo/planner": 1}) as s:
        with_auth(s, ("0a0a0a0a", KEY_A, ["demo"], {"max_concurrent": 4, "rpm": 600}))
        client = sdk(s, KEY_A, s.url + "/d/demo")
        r = await client.chat.completions.create(model="planner", messages=CHAT)
        stream = await client.chat.completions.create(model="planner", messages=CHAT, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        with pytest.raises(openai.AuthenticationError) as no_key:
            await sdk(s, "not-a-key").chat.completions.create(model="demo/planner", messages=CHAT)
        seen = s.engines["demo/planner"][0].calls
        assert s.http is not None
        await s.post("/scepsy/v1/spans", {"span": "request", "event": "start", "request": "r1"}, headers=bearer(KEY_A))
        trace_text = (await s.close_gateway(), s.trace_path.read_text())[1]
    assert r.choices[0].message.content == "Hello world" and text == "Hello world"
    assert no_key.value.status_code == 401
    assert all("authorization" not in {k.lower() for k in c.headers} for c in seen)
    for secret in (KEY_A, KEY_A[-43:]):
        assert secret not in trace_text and secret not in caplog.text
    assert stat.S_IMODE(os.stat(s.trace_path).st_mode) == 0o600


async def test_test_hooks_and_the_clients_credentials_are_not_forwarded(stack: Any) -> None:
    hostile = {"X-Sim-Fault": "http500", "x-sim-other": "1", "Cookie": "c=1", "X-Other": "kept"}
    async with stack({"demo/planner": 1}) as s:
        with_auth(s, ("0a0a0a0a", KEY_A, ["demo"], {}))
        status, _ = await s.post("/v1/chat/completions", {"model": "demo/planner", "messages": CHAT},
                                 headers={**hostile, **bearer(KEY_A)})
        seen = s.engines["demo/planner"][0].calls[0].headers
    lower = {k.lower() for k in seen}
    assert status == 200 and "x-other" in lower
    assert not lower & {"x-sim-fault", "x-sim-other", "authorization", "cookie"}   # the client key stays here


async def test_without_keys_the_clients_authorization_goes_on_but_test_hooks_never(stack: Any) -> None:
    # A hand-run gateway (no `auth` section) in front of engines the user guards with their own --api-key.
    async with stack({"planner": 1}) as s:
        status, _ = await s.post("/v1/chat/completions", {"model": "planner", "messages": CHAT},
                                 headers={"X-Sim-Fault": "http500", "x-sim-other": "1", "Authorization": "Bearer k"})
        seen = s.engines["planner"][0].calls[0].headers
    assert status == 200 and seen.get("Authorization") == "Bearer k"
    assert not {k.lower() for k in seen} & {"x-sim-fault", "x-sim-other"}


async def test_a_trace_file_holding_an_earlier_run_is_refused_unless_appending(tmp_path: Path) -> None:
    ep = tmp_path / "endpoints.yaml"
    ep.write_text("llms: {}\n")
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"kind": "call", "request": "r", "llm": "x", "t_start": 0, "t_end": 1, "call_id": "c-000041"}\n')
    os.chmod(trace, 0o644)
    with pytest.raises(ScepsyError) as refused:
        await start_gateway(ep, trace)
    gw = await start_gateway(ep, trace, append_trace=True)
    try:
        next_id = gw.state.next_call_id()
    finally:
        await gw.close()
    assert "already holds" in str(refused.value) and str(trace) in str(refused.value)
    assert "one trace per run" in str(refused.value)
    assert next_id == "c-000042" and stat.S_IMODE(os.stat(trace).st_mode) == 0o600
    old = os.umask(0)
    try:
        fresh = tmp_path / "fresh.jsonl"
        gw = await start_gateway(ep, fresh)
        await gw.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o600


def test_the_auth_section_refuses_duplicate_keys_and_keys_for_nothing(tmp_path: Path) -> None:
    ep = tmp_path / "endpoints.yaml"
    ep.write_text("llms: {}\nauth:\n  keys:\n"
                  f"    - {{id: k1, sha256: {sha('a')}, deployments: [demo]}}\n"
                  f"    - {{id: k1, sha256: {sha('a')}, deployments: []}}\n")
    with pytest.raises(SpecError) as err:
        load_endpoints(ep)
    msg = str(err.value)
    assert "endpoints.yaml:5" in msg and "key id 'k1' is also auth.keys[0]" in msg
    assert "the same key (sha256) as auth.keys[0]" in msg and "at least one deployment" in msg


async def test_many_clients_over_a_limit_never_leak_an_in_flight_slot(stack: Any) -> None:
    async with stack({"demo/planner": 1}) as s:
        with_auth(s, ("0a0a0a0a", KEY_A, ["demo"], {"max_concurrent": 3}))
        assert s.http is not None

        async def one() -> int:
            async with aiohttp.ClientSession(trust_env=False) as http:
                async with http.post(s.url + "/v1/chat/completions", json={"model": "demo/planner", "messages": CHAT},
                                     headers=bearer(KEY_A)) as r:
                    return r.status

        got = await asyncio.gather(*(one() for _ in range(30)))
        async with s.http.get(s.url + "/scepsy/v1/stats", headers=bearer(KEY_A)) as r:
            per_key = (await r.json())["auth"]["per_key"]["0a0a0a0a"]
    assert set(got) <= {200, 429} and got.count(200) >= 3
    assert per_key["in_flight"] == 0 and per_key["calls"] == got.count(200)
    assert per_key["rate_limited"].get("max_concurrent", 0) == got.count(429)
