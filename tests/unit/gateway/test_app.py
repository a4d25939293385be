"""The gateway over fake engines: routes, body rewriting, streaming passthrough, trace records, spans."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scepsy_hpc.trace.records import CallRecord, SpanRecord

# gateway scenarios take well under a second: a hang fails here instead of blocking the suite
pytestmark = pytest.mark.timeout(10)

CHAT = [{"role": "user", "content": "hi"}]


async def test_models_health_and_404_lists_known_models(stack: Any) -> None:
    async with stack({"planner": 1, "coder": 1, "critic": 1}) as s:
        client = s.client()
        models = await client.models.list()
        assert [m.id for m in models.data] == ["coder", "critic", "planner"]
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="plannr", messages=CHAT)
        status, health = await s.get("/health")
        other, other_body = await s.post("/r/r-1/v1/embeddings", {"model": "planner", "input": "x"})
    assert other == 404 and other_body["error"]["code"] == "route_not_found"
    assert "POST /r/r-1/v1/embeddings is not served" in other_body["error"]["message"]
    assert info.value.status_code == 404
    assert "unknown model 'plannr'; this gateway serves: coder, critic, planner" in info.value.message
    assert info.value.body == {"message": "unknown model 'plannr'; this gateway serves: coder, critic, planner",
                               "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    assert status == 200 and json.loads(health)["llms"] == ["coder", "critic", "planner"]


async def test_bad_bodies_are_400(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        st1, b1 = await s.post("/v1/chat/completions", b"{not json")
        st2, b2 = await s.post("/v1/chat/completions", {"messages": CHAT})
        st3, b3 = await s.post("/v1/completions", [1, 2])
        assert s.engines["planner"][0].calls == []
    assert (st1, b1["error"]["type"], b1["error"]["code"]) == (400, "invalid_request_error", "invalid_json")
    assert st2 == 400 and b2["error"]["param"] == "model" and "planner" in b2["error"]["message"]
    assert st3 == 400 and "JSON object" in b3["error"]["message"]


async def test_unary_passthrough_rewrites_model_and_strips_role(stack: Any) -> None:
    async with stack({"planner": 1}, served={"planner": "llama-3.1-8b-instruct"}) as s:
        status, body = await s.post("/v1/chat/completions",
                                    {"model": "planner", "messages": CHAT, "max_tokens": 5,
                                     "metadata": {"scepsy_role": "plan"}},
                                    headers={"X-Scepsy-Request": "r-7", "Authorization": "Bearer k"})
        status2, _ = await s.post("/r/r-8/v1/completions",
                                  {"model": "planner", "prompt": [1, 2, 3], "metadata": {"scepsy_role": "x", "keep": "1"}},
                                  headers={"X-Scepsy-Request": "ignored", "X-Scepsy-Role": "summarise"})
        seen = s.engines["planner"][0].calls
        trace = await s.close_gateway()
    assert status == 200 and status2 == 200
    assert body["choices"][0]["message"]["content"] == "Hello world" and body["served_by"] == "planner-0"
    assert seen[0].path == "/v1/chat/completions" and seen[1].path == "/v1/completions"
    assert seen[0].body == {"model": "llama-3.1-8b-instruct", "messages": CHAT, "max_tokens": 5}
    assert seen[1].body["metadata"] == {"keep": "1"}  # only our key is removed
    # No `auth` section and no replica secret (a hand-run gateway): the client's Authorization is for the engine.
    assert seen[0].headers["Authorization"] == "Bearer k"
    assert not any(k.lower().startswith("x-scepsy") for k in seen[0].headers)
    assert trace.meta["source"] == "gateway" and trace.meta["time_scale"] == 1.0 and "started" in trace.meta
    c1, c2 = trace.calls
    assert (c1.request, c1.role, c1.llm, c1.model) == ("r-7", "plan", "planner", "llama-3.1-8b-instruct")
    assert (c2.request, c2.role) == ("r-8", "summarise")  # the path wins over the header; the header role over metadata
    assert (c1.prompt_tokens, c1.completion_tokens, c1.t_first, c1.status, c1.http_status) == (7, 3, None, "ok", 200)
    assert c1.replica == s.engines["planner"][0].url and not c1.stream
    assert 0 <= c1.t_start <= c1.t_end <= c2.t_start <= c2.t_end
    assert c1.call_id != c2.call_id


async def test_trace_times_are_model_seconds(stack: Any) -> None:
    async with stack({"planner": 1}, time_scale=0.001) as s:
        eng = s.engines["planner"][0]
        eng.gate.clear()
        call = asyncio.create_task(s.post("/r/r-1/v1/chat/completions", {"model": "planner", "messages": CHAT}))
        await eng.wait_calls(1)
        await asyncio.sleep(0.02)  # the quantity under test is elapsed time itself
        eng.gate.set()
        await call
        trace = await s.close_gateway()
    (c,) = trace.calls
    assert trace.meta["time_scale"] == 0.001
    assert c.duration_s >= 20.0  # 20 ms of wall time at scale 0.001 is 20 model seconds


async def test_streaming_drops_injected_usage_chunk(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        client = s.client()
        stream = await client.chat.completions.create(model="planner", messages=CHAT, stream=True)
        chunks = [c async for c in stream]
        seen = s.engines["planner"][0].calls[0].body
        trace = await s.close_gateway()
    assert seen["stream_options"] == {"include_usage": True}  # injected upstream
    assert all(c.choices for c in chunks)  # the usage-only chunk never reached the client
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello world"
    (c,) = trace.calls
    assert c.stream and c.status == "ok" and (c.prompt_tokens, c.completion_tokens) == (7, 3)
    assert c.t_first is not None and c.t_start <= c.t_first <= c.t_end


async def test_streaming_keeps_usage_chunk_when_asked(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        stream = await s.client().completions.create(model="planner", prompt="x", stream=True,
                                                     stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        trace = await s.close_gateway()
    assert [c.choices[0].text for c in chunks[:-1]] == ["Hel", "lo", " world"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert trace.calls[0].completion_tokens == 3


async def test_stream_chunks_pass_through_as_they_arrive(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        eng = s.engines["planner"][0]
        eng.chunk_gate = asyncio.Semaphore(0)
        assert s.http is not None
        async with s.http.post(s.url + "/v1/chat/completions",
                               json={"model": "planner", "messages": CHAT, "stream": True}) as resp:
            events = s.sse_events(resp)
            got = [json.loads(await anext(events))]  # the role chunk, before any token is allowed
            for expect in ("Hel", "lo", " world"):
                eng.chunk_gate.release()  # the engine may produce exactly one more token
                got.append(json.loads(await anext(events)))
                assert got[-1]["choices"][0]["delta"]["content"] == expect
            rest = [e async for e in events]
        trace = await s.close_gateway()
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert rest == [b"[DONE]"]
    assert trace.calls[0].t_first is not None


async def test_spans_pair_start_and_end(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        ev = {"span": "request", "request": "r-1"}
        assert (await s.post("/scepsy/v1/spans", {**ev, "event": "start"}))[0] == 200
        for _ in range(2):  # two concurrent tool calls of one name: paired first-in first-out
            await s.post("/scepsy/v1/spans", {"span": "tool", "event": "start", "request": "r-1", "name": "web_search"})
        await s.post("/scepsy/v1/spans", {"span": "tool", "event": "end", "request": "r-1", "name": "web_search"})
        await s.post("/scepsy/v1/spans", {"span": "tool", "event": "end", "request": "r-1", "name": "web_search",
                                          "status": "error", "error": "timeout"})
        status, body = await s.post("/scepsy/v1/spans", {**ev, "event": "end", "status": "ok"})
        bad_end = await s.post("/scepsy/v1/spans", {**ev, "event": "end"})
        bad_kind = await s.post("/scepsy/v1/spans", {"span": "llm", "event": "start", "request": "r-1"})
        bad_key = await s.post("/scepsy/v1/spans", {**ev, "event": "start", "when": 3})
        trace = await s.close_gateway()
    assert status == 200 and body["t_end"] >= body["t_start"]
    assert bad_end[0] == 400 and "never started" in bad_end[1]["error"]["message"]
    assert bad_kind[0] == 400 and "'request' or 'tool'" in bad_kind[1]["error"]["message"]
    assert bad_key[0] == 400 and "'when'" in bad_key[1]["error"]["message"]
    tools = [sp for sp in trace.spans if sp.span == "tool"]
    (req,) = [sp for sp in trace.spans if sp.span == "request"]
    assert [(t.name, t.status, t.error) for t in tools] == [("web_search", "ok", None), ("web_search", "error", "timeout")]
    assert tools[0].t_start <= tools[1].t_start and all(req.t_start <= t.t_start <= t.t_end <= req.t_end for t in tools)
    assert isinstance(req, SpanRecord) and req.request == "r-1"


async def test_metrics_report_calls_outstanding_and_queue(stack: Any) -> None:
    async with stack({"planner": 1}, caps={"planner": 1}) as s:
        eng = s.engines["planner"][0]
        eng.gate.clear()
        calls = [asyncio.create_task(s.post("/v1/chat/completions", {"model": "planner", "messages": CHAT}))
                 for _ in range(3)]
        await eng.wait_calls(1)
        pool = s.gw.state.router.pool("planner")
        await s.until(lambda: pool.queue_length() == 2)
        _, text = await s.get("/metrics")
        eng.gate.set()
        await asyncio.gather(*calls)
        _, after = await s.get("/metrics")
    assert 'scepsy_gateway_calls_total{llm="planner"} 3' in text
    assert f'scepsy_gateway_outstanding{{llm="planner",replica="{eng.url}"}} 1' in text
    assert f'scepsy_gateway_replica_calls_total{{llm="planner",replica="{eng.url}"}} 1' in text
    assert 'scepsy_gateway_queue_length{llm="planner"} 2' in text
    assert 'scepsy_gateway_queue_length{llm="planner"} 0' in after
    assert f'scepsy_gateway_outstanding{{llm="planner",replica="{eng.url}"}} 0' in after


async def test_routing_through_gateway_fifo_when_full(stack: Any) -> None:
    async with stack({"planner": 2}, caps={"planner": 1}) as s:
        e0, e1 = s.engines["planner"]
        e0.gate.clear()
        e1.gate.clear()

        def call(n: int) -> asyncio.Task[Any]:
            return asyncio.create_task(s.post("/v1/completions", {"model": "planner", "prompt": f"p{n}"}))

        a, b = call(0), call(1)
        await e0.wait_calls(1)
        await e1.wait_calls(1)
        pool = s.gw.state.router.pool("planner")
        c = call(2)
        await s.until(lambda: pool.queue_length() == 1)
        d = call(3)
        await s.until(lambda: pool.queue_length() == 2)
        e1.gate.set()  # e1 finishes its call; the queued calls go there in arrival order
        await asyncio.gather(b, c, d)
        assert [x.body["prompt"] for x in e1.calls] == ["p1", "p2", "p3"]
        assert [x.body["prompt"] for x in e0.calls] == ["p0"] and not a.done()
        e0.gate.set()
        await a
        trace = await s.close_gateway()
    assert sorted(c.replica for c in trace.calls) == sorted([e0.url] + [e1.url] * 3)


async def test_reload_moves_new_calls_to_new_replicas(stack: Any) -> None:
    async with stack({"planner": 2}) as s:
        e0, e1 = s.engines["planner"]
        e0.gate.clear()
        held = asyncio.create_task(s.post("/v1/completions", {"model": "planner", "prompt": "held"}))
        await e0.wait_calls(1)
        s.write_endpoints(f"llms:\n  planner:\n    replicas: [{e1.url}]\n  coder:\n    replicas: [{e1.url}]\n")
        for _ in range(3):
            assert (await s.post("/v1/completions", {"model": "planner", "prompt": "new"}))[0] == 200
        assert (await s.post("/v1/completions", {"model": "coder", "prompt": "c"}))[0] == 200
        e0.gate.set()
        status, _ = await held  # the call in flight on the removed replica finishes normally
        models = [m.id for m in (await s.client().models.list()).data]
    assert status == 200 and models == ["coder", "planner"]
    assert [x.body["prompt"] for x in e1.calls] == ["new"] * 3 + ["c"]
    assert [x.body["prompt"] for x in e0.calls] == ["held"]


def test_call_record_round_trips() -> None:
    rec = CallRecord(request="r", llm="a", t_start=0.0, t_end=1.0)
    assert rec.duration_s == 1.0


# The gateway's families as exposed before prometheus_client wrote them; a scraper must see exactly these.
GATEWAY_FAMILIES = [
    ("scepsy_gateway_calls_total", "counter"),
    ("scepsy_gateway_errors_total", "counter"),
    ("scepsy_gateway_outstanding", "gauge"),
    ("scepsy_gateway_replica_calls_total", "counter"),
    ("scepsy_gateway_max_outstanding", "gauge"),
    ("scepsy_gateway_queue_length", "gauge"),
    ("scepsy_gateway_held", "gauge"),
    ("scepsy_gateway_held_calls_total", "counter"),
    ("scepsy_gateway_hold_timeouts_total", "counter"),
    ("scepsy_gateway_draining_outstanding", "gauge"),
    ("scepsy_gateway_open_spans", "gauge"),
    ("scepsy_gateway_spans_total", "counter"),
    ("scepsy_gateway_spans_dropped_total", "counter"),
    ("scepsy_gateway_max_requests", "gauge"),
    ("scepsy_gateway_requests_in_flight", "gauge"),
    ("scepsy_gateway_requests_waiting", "gauge"),
    ("scepsy_gateway_requests_admitted_total", "counter"),
    ("scepsy_gateway_requests_waited_total", "counter"),
    ("scepsy_gateway_requests_wait_timeouts_total", "counter"),
    ("scepsy_gateway_requests_queue_full_total", "counter"),
    ("scepsy_gateway_requests_idle_ended_total", "counter"),
    ("scepsy_gateway_requests_readmitted_total", "counter"),
    ("scepsy_gateway_uncapped_calls_total", "counter"),
    ("scepsy_gateway_endpoints_reloads_total", "counter"),
    ("scepsy_gateway_refused_total", "counter"),
    ("scepsy_gateway_unauthorized_total", "counter"),
    ("scepsy_gateway_key_calls_total", "counter"),
    ("scepsy_gateway_key_refused_total", "counter"),
    ("scepsy_gateway_key_rate_limited_total", "counter"),
    ("scepsy_gateway_key_in_flight", "gauge"),
]


async def test_metrics_parse_with_prometheus_client_under_the_recorded_names(stack: Any) -> None:
    async with stack({"planner": 1, "coder": 1}, caps={"planner": 3}) as s:
        s.engines["coder"][0].fault = "http500"
        await s.post("/v1/chat/completions", {"model": "planner", "messages": CHAT})
        await s.post("/v1/chat/completions", {"model": "coder", "messages": CHAT})
        await s.post("/scepsy/v1/spans", {"span": "request", "event": "start", "request": "r"})
        assert s.http is not None
        async with s.http.get(s.url + "/metrics") as r:
            content_type, text = r.headers["Content-Type"], await r.text()
        urls = {name: engines[0].url for name, engines in s.engines.items()}
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert [tuple(line.split()[2:4]) for line in text.splitlines() if line.startswith("# TYPE ")] == GATEWAY_FAMILIES
    samples = [x for fam in text_string_to_metric_families(text) for x in fam.samples]
    unused = {"scepsy_gateway_held_calls_total", "scepsy_gateway_hold_timeouts_total",
              "scepsy_gateway_draining_outstanding",  # nothing held or drained here: no samples yet
              "scepsy_gateway_refused_total", "scepsy_gateway_key_calls_total", "scepsy_gateway_key_refused_total",
              "scepsy_gateway_key_rate_limited_total", "scepsy_gateway_key_in_flight",  # nothing refused, no keys
              *(name for name, _ in GATEWAY_FAMILIES if "_requests" in name)}   # no request cap
    assert {x.name for x in samples} == {name for name, _ in GATEWAY_FAMILIES} - unused  # no `_created` series
    value = {(x.name, tuple(sorted(x.labels.items()))): x.value for x in samples}
    assert value[("scepsy_gateway_calls_total", (("llm", "coder"),))] == 1
    assert value[("scepsy_gateway_calls_total", (("llm", "planner"),))] == 1
    assert value[("scepsy_gateway_errors_total", (("llm", "coder"),))] == 1
    assert ("scepsy_gateway_errors_total", (("llm", "planner"),)) not in value
    assert value[("scepsy_gateway_max_outstanding", (("llm", "planner"), ("replica", urls["planner"])))] == 3
    assert value[("scepsy_gateway_replica_calls_total", (("llm", "coder"), ("replica", urls["coder"])))] == 1
    assert value[("scepsy_gateway_outstanding", (("llm", "planner"), ("replica", urls["planner"])))] == 0
    assert value[("scepsy_gateway_held", (("llm", "planner"),))] == 0
    assert value[("scepsy_gateway_open_spans", ())] == 1 and value[("scepsy_gateway_spans_total", ())] == 0
    assert value[("scepsy_gateway_endpoints_reloads_total", ())] == 0  # the file has not changed since start
