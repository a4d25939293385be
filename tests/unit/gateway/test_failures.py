"""Failure modes: each gives the client a clear error, is traced as an error, and the gateway serves on."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

# gateway scenarios take well under a second: a hang fails here instead of blocking the suite
pytestmark = pytest.mark.timeout(10)

CHAT = [{"role": "user", "content": "hi"}]


async def test_unreachable_replica_fails_over_to_a_live_one(stack: Any) -> None:
    async with stack({"planner": 1}, dead={"planner": 1}) as s:
        live = s.engines["planner"][0]
        client = s.client()
        for i in range(3):
            r = await client.chat.completions.create(model="planner", messages=CHAT, extra_headers={"X-Scepsy-Request": f"r{i}"})
            assert r.choices[0].message.content == "Hello world"
        dead_state = s.gw.state.router.pool("planner").replicas[0]
        trace = await s.close_gateway()
    assert len(live.calls) == 3
    assert all(c.status == "ok" and c.replica == live.url for c in trace.calls)
    assert dead_state.connect_failures == 1  # marked down after the first refusal, so not retried each call


async def test_only_replica_down_is_502_naming_it_without_a_hold(stack: Any) -> None:
    async with stack({"planner": 0, "coder": 1}, dead={"planner": 1}, hold_s=0) as s:
        dead = s.gw.state.router.pool("planner").replicas[0].url
        status, body = await s.post("/r/r-1/v1/chat/completions", {"model": "planner", "messages": CHAT})
        ok, _ = await s.post("/r/r-2/v1/chat/completions", {"model": "coder", "messages": CHAT})
        trace = await s.close_gateway()
    assert status == 502
    assert body == {"error": {"message": f"llm 'planner': replica {dead} unreachable (connection refused); no other replica",
                              "type": "upstream_unavailable", "code": 502}}
    assert ok == 200
    failed = trace.calls[0]
    assert (failed.status, failed.http_status, failed.replica) == ("error", 502, dead)
    assert "unreachable" in (failed.error or "")


async def test_upstream_500_is_reported_with_llm_replica_and_message(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        eng = s.engines["planner"][0]
        eng.fault = "http500"
        with pytest.raises(openai.InternalServerError) as info:
            await s.client().chat.completions.create(model="planner", messages=CHAT)
        eng.fault = None
        again = await s.client().chat.completions.create(model="planner", messages=CHAT)
        trace = await s.close_gateway()
    assert info.value.status_code == 500
    assert info.value.body == {"message": f"llm 'planner': replica {eng.url} returned HTTP 500: CUDA out of memory",
                               "type": "upstream_error", "code": 500}
    assert again.choices[0].message.content == "Hello world"
    assert [(c.status, c.http_status) for c in trace.calls] == [("error", 500), ("ok", 200)]
    assert "CUDA out of memory" in (trace.calls[0].error or "")


async def test_upstream_4xx_passes_through_unchanged(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        s.engines["planner"][0].fault = "http400"
        status, body = await s.post("/r/r-1/v1/completions", {"model": "planner", "prompt": "x", "max_tokens": 10**9})
        trace = await s.close_gateway()
    assert status == 400
    assert body == {"object": "error", "message": "max_tokens is too large", "type": "BadRequestError", "code": 400}
    assert (trace.calls[0].status, trace.calls[0].error) == ("error", "max_tokens is too large")


async def test_connection_closed_mid_stream_sends_error_event(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        eng = s.engines["planner"][0]
        eng.fault = "cut"
        stream = await s.client().chat.completions.create(model="planner", messages=CHAT, stream=True)
        got: list[str] = []
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
        eng.fault = None
        status, _ = await s.post("/r/r-2/v1/chat/completions", {"model": "planner", "messages": CHAT})
        trace = await s.close_gateway()
    assert "".join(got) == "Hello"  # what arrived before the cut reached the client
    assert info.value.message.startswith(f"llm 'planner': replica {eng.url} closed the connection mid-stream")
    assert status == 200  # the gateway serves the next call
    cut = [c for c in trace.calls if c.request is None or c.request != "r-2"][0]
    assert (cut.status, cut.http_status, cut.stream) == ("error", 200, True)
    assert cut.t_first is not None and "mid-stream" in (cut.error or "")
    assert [c.status for c in trace.calls if c.request == "r-2"] == ["ok"]


async def test_connection_closed_mid_stream_raw_event(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        s.engines["planner"][0].fault = "cut"
        assert s.http is not None
        async with s.http.post(s.url + "/r/r-1/v1/completions",
                               json={"model": "planner", "prompt": "x", "stream": True}) as resp:
            events = [e async for e in s.sse_events(resp)]
    assert resp.status == 200
    last = json.loads(events[-1])
    assert last["error"]["type"] == "upstream_error" and last["error"]["code"] == 502
    assert b"[DONE]" not in events and len(events) == 3  # two tokens, then the error


async def test_connection_closed_mid_unary_is_502(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        eng = s.engines["planner"][0]
        eng.fault = "cut"
        status, body = await s.post("/r/r-1/v1/chat/completions", {"model": "planner", "messages": CHAT})
        eng.fault = None
        ok, _ = await s.post("/r/r-2/v1/chat/completions", {"model": "planner", "messages": CHAT})
        trace = await s.close_gateway()
    assert status == 502 and ok == 200
    assert body["error"]["message"] == (f"llm 'planner': replica {eng.url} closed the connection mid-response "
                                        "(the response was cut off)")
    assert [(c.request, c.status, c.http_status) for c in trace.calls] == [("r-1", "error", 502), ("r-2", "ok", 200)]


async def test_client_leaving_mid_stream_frees_the_slot(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        eng = s.engines["planner"][0]
        eng.chunk_gate = asyncio.Semaphore(0)
        assert s.http is not None
        async with s.http.post(s.url + "/r/r-1/v1/chat/completions",
                               json={"model": "planner", "messages": CHAT, "stream": True}) as resp:
            await resp.content.readline()  # the role chunk arrived; now hang up
            resp.close()
        for _ in range(3):
            eng.chunk_gate.release()  # the engine goes on; the gateway finds the client gone
        replica = s.gw.state.router.pool("planner").replicas[0]
        await s.until(lambda: replica.outstanding == 0)
        eng.chunk_gate = None
        status, _ = await s.post("/r/r-2/v1/chat/completions", {"model": "planner", "messages": CHAT})
        trace = await s.close_gateway()
    assert status == 200
    first = trace.calls[0]
    assert first.request == "r-1" and first.status == "error" and "client disconnected" in (first.error or "")


async def test_client_leaving_right_after_done_is_not_an_error(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        assert s.http is not None
        async with s.http.post(s.url + "/r/r-1/v1/chat/completions",
                               json={"model": "planner", "messages": CHAT, "stream": True}) as resp:
            while True:  # read up to [DONE] and hang up at once, as many clients do
                line = await resp.content.readline()
                if line.strip() == b"data: [DONE]" or not line:
                    break
            resp.close()
        replica = s.gw.state.router.pool("planner").replicas[0]
        await s.until(lambda: replica.outstanding == 0)
        trace = await s.close_gateway()
    (call,) = trace.calls
    assert call.status == "ok", call.error
    assert call.completion_tokens and call.completion_tokens > 0


async def test_a_500_before_any_byte_is_retried_once_on_another_replica(stack: Any) -> None:
    async with stack({"planner": 2}) as s:
        bad, good = s.engines["planner"]
        bad.fault = "http500"
        client = s.client()
        for i in range(4):   # least-outstanding with round-robin ties: the bad replica is tried first half the time
            r = await client.chat.completions.create(model="planner", messages=CHAT, extra_headers={"X-Scepsy-Request": f"r{i}"})
            assert r.choices[0].message.content == "Hello world"
        trace = await s.close_gateway()
    assert len(bad.calls) >= 1 and len(good.calls) == 4
    assert all((c.status, c.http_status, c.replica) == ("ok", 200, good.url) for c in trace.calls)


async def test_a_unary_call_cut_mid_response_is_retried_once_and_a_second_failure_is_returned(stack: Any) -> None:
    async with stack({"planner": 2}) as s:
        first, second = s.engines["planner"]
        first.fault = "cut"
        ok, _ = await s.post("/r/r-1/v1/chat/completions", {"model": "planner", "messages": CHAT})
        second.fault = "http500"
        status, body = await s.post("/r/r-2/v1/chat/completions", {"model": "planner", "messages": CHAT})
        trace = await s.close_gateway()
    assert ok == 200
    assert status in (500, 502) and body["error"]["type"] == "upstream_error"   # tried once each, then given up
    assert len(first.calls) + len(second.calls) == 4
    assert [(c.request, c.status) for c in trace.calls] == [("r-1", "ok"), ("r-2", "error")]


async def test_a_stream_cut_after_bytes_reached_the_client_is_not_retried(stack: Any) -> None:
    async with stack({"planner": 2}) as s:
        for eng in s.engines["planner"]:
            eng.fault = "cut"
        stream = await s.client().chat.completions.create(model="planner", messages=CHAT, stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
        trace = await s.close_gateway()
    assert sum(len(e.calls) for e in s.engines["planner"]) == 1   # the cut call went to one replica only
    assert trace.calls[0].status == "error" and "mid-stream" in (trace.calls[0].error or "")


async def test_a_stream_cut_before_its_first_byte_is_retried_on_another_replica(stack: Any) -> None:
    async with stack({"planner": 2}) as s:
        for eng in s.engines["planner"]:
            eng.fault = "cut-first"
        bad, good = s.engines["planner"]
        good.fault = None
        client = s.client()
        for i in range(4):   # half of them go to the bad replica first: the client never sees its cut
            stream = await client.chat.completions.create(model="planner", messages=CHAT, stream=True,
                                                          extra_headers={"X-Scepsy-Request": f"r{i}"})
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == "Hello world"
        trace = await s.close_gateway()
    assert len(bad.calls) >= 1 and len(good.calls) == 4
    assert all(c.status == "ok" for c in trace.calls)


async def test_a_call_cut_on_the_only_replica_is_retried_on_it_once_it_is_back(stack: Any) -> None:
    async with stack({"planner": 1}, hold_s=5.0) as s:
        eng = s.engines["planner"][0]
        eng.fault = "cut-first-once"   # an engine that died under its first call and is back for the retry
        stream = await s.client().chat.completions.create(model="planner", messages=CHAT, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        eng.fault = "cut-first"
        status, body = await s.post("/r/r-2/v1/chat/completions", {"model": "planner", "messages": CHAT, "stream": True})
        trace = await s.close_gateway()
    assert text == "Hello world" and len(eng.calls) == 4   # one retry each: a second cut is returned
    assert status == 502 and "before its first byte" in body["error"]["message"]
    assert [c.status for c in trace.calls] == ["ok", "error"]
