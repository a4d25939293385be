"""One gateway for several deployments: aliases share a pool, `/d/{deployment}` scopes model names,
and `/scepsy/v1/stats` reports each LLM key's load and its last minute."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

from scepsy_hpc.gateway.metrics import CallWindow
from scepsy_hpc.trace.records import CallRecord

# gateway scenarios take well under a second: a hang fails here instead of blocking the suite
pytestmark = pytest.mark.timeout(10)

CHAT = [{"role": "user", "content": "hi"}]


async def test_aliases_share_one_pool_its_cap_and_fifo(stack: Any) -> None:
    async with stack({"dep/planner": 1}, caps={"dep/planner": 1}, served={"dep/planner": "llama"},
                     aliases={"dep/planner": ["planner", "plan"]}) as s:
        eng = s.engines["dep/planner"][0]
        eng.gate.clear()
        router = s.gw.state.router
        pool = router.pool("dep/planner")
        assert router.pool("planner") is pool and router.pool("plan") is pool
        first = asyncio.create_task(s.post("/v1/chat/completions", {"model": "planner", "messages": CHAT}))
        await eng.wait_calls(1)
        second = asyncio.create_task(s.post("/v1/chat/completions", {"model": "plan", "messages": CHAT}))
        await s.until(lambda: pool.queue_length() == 1)  # the alias waits behind the key's cap: one pool
        assert sum(r.outstanding for r in pool.replicas) == 1
        eng.gate.set()
        (st1, _), (st2, _) = await asyncio.gather(first, second)
        models = (await s.client().models.list()).data
        trace = await s.close_gateway()
    assert (st1, st2) == (200, 200)
    assert [c.body["model"] for c in eng.calls] == ["llama", "llama"]
    assert [(c.llm, c.model) for c in trace.calls] == [("dep/planner", "llama")] * 2  # traced under the key
    assert [(m.id, getattr(m, "scepsy_target", None)) for m in models] == [
        ("dep/planner", None), ("plan", "dep/planner"), ("planner", "dep/planner")]


async def test_deployment_prefix_resolves_the_deployments_own_names(stack: Any) -> None:
    async with stack({"a/planner": 1, "a/coder": 1, "b/planner": 1}) as s:
        a_planner, b_planner = s.engines["a/planner"][0], s.engines["b/planner"][0]
        # The unmodified openai SDK, given only a base URL, with the workflow's own LLM name.
        reply = await s.client(s.url + "/d/a").chat.completions.create(model="planner", messages=CHAT)
        status, _ = await s.post("/d/b/r/req-9/v1/chat/completions", {"model": "planner", "messages": CHAT},
                                 headers={"X-Scepsy-Request": "ignored"})
        across, _ = await s.post("/d/a/v1/completions", {"model": "b/planner", "prompt": "x"})  # then as given
        listed = await s.client(s.url + "/d/a").models.list()
        trace = await s.close_gateway()
    assert reply.choices[0].message.content == "Hello world"
    assert [c.path for c in a_planner.calls] == ["/v1/chat/completions"]
    assert [c.path for c in b_planner.calls] == ["/v1/chat/completions", "/v1/completions"]
    assert a_planner.calls[0].body["model"] == "a/planner"  # no served_model: the key is the served name
    assert (status, across) == (200, 200)
    assert [(c.llm, c.request) for c in trace.calls] == [("a/planner", None), ("b/planner", "req-9"),
                                                          ("b/planner", None)]
    assert [(m.id, getattr(m, "scepsy_target", None)) for m in listed.data] == [
        ("coder", "a/coder"), ("planner", "a/planner")]


async def test_unknown_names_under_a_deployment_are_404s_that_list_what_works(stack: Any) -> None:
    async with stack({"a/planner": 1, "a/coder": 1, "b/critic": 1}) as s:
        with pytest.raises(openai.NotFoundError) as info:
            await s.client(s.url + "/d/a").chat.completions.create(model="critic", messages=CHAT)
        st_dep, body_dep = await s.post("/d/zz/r/r-1/v1/chat/completions", {"model": "planner", "messages": CHAT})
        st_models, body_models = await s.get("/d/zz/v1/models")
        st_none, body_none = await s.post("/d/a/v1/completions", {"prompt": "x"})
        st_route, body_route = await s.post("/d/a/v1/embeddings", {"model": "planner", "input": "x"})
        assert not any(e.calls for engines in s.engines.values() for e in engines)
    assert info.value.status_code == 404
    assert info.value.body == {"message": "unknown model 'critic' in deployment 'a'; it serves: coder, planner",
                               "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    assert st_dep == 404 and body_dep["error"]["code"] == "model_not_found"
    assert body_dep["error"]["message"] == ("unknown deployment 'zz' (model 'planner'); "
                                            "this gateway serves deployments: a, b")
    assert st_models == 404 and json.loads(body_models)["error"]["message"] == (
        "unknown deployment 'zz'; this gateway serves deployments: a, b")
    assert st_none == 400 and "(coder, planner)" in body_none["error"]["message"]
    assert st_route == 404 and body_route["error"]["code"] == "route_not_found"


async def test_a_404_lists_at_most_twenty_names(stack: Any) -> None:
    async with stack({f"d/m{i:02d}": 0 for i in range(30)}) as s:
        status, body = await s.post("/v1/completions", {"model": "nope", "prompt": "x"})
        scoped, scoped_body = await s.post("/d/d/v1/completions", {"model": "nope", "prompt": "x"})
    listed = ", ".join(f"d/m{i:02d}" for i in range(20))
    assert status == 404
    assert body["error"]["message"] == (f"unknown model 'nope'; this gateway serves: {listed}, "
                                        "… (30 in all; GET /v1/models lists them)")
    assert scoped == 404 and scoped_body["error"]["message"].endswith("m19, … (30 in all; GET /v1/models lists them)")


async def test_stats_report_counts_load_and_the_last_minute(stack: Any) -> None:
    async with stack({"planner": 1, "coder": 1}, dead={"planner": 1}) as s:
        s.engines["coder"][0].fault = "http500"
        for _ in range(2):
            assert (await s.post("/v1/completions", {"model": "planner", "prompt": "x"}))[0] == 200
        stream = await s.client().chat.completions.create(model="planner", messages=CHAT, stream=True)
        assert len([c async for c in stream]) == 4
        assert (await s.post("/v1/completions", {"model": "coder", "prompt": "x"}))[0] == 500
        eng = s.engines["planner"][0]
        eng.gate.clear()
        held = asyncio.create_task(s.post("/v1/completions", {"model": "planner", "prompt": "held"}))
        await eng.wait_calls(4)
        status, text = await s.get("/scepsy/v1/stats")
        eng.gate.set()
        await held
    assert status == 200
    stats = json.loads(text)
    uptime = stats["uptime_s"]
    span = max(1.0, min(60.0, uptime))
    planner, coder = stats["models"]["planner"], stats["models"]["coder"]
    assert 0 < uptime < 10 and stats["time_scale"] == 1.0
    assert {k: planner[k] for k in ("calls", "errors", "outstanding", "queued", "replicas", "replicas_up")} == {
        "calls": 4, "errors": 0, "outstanding": 1, "queued": 0, "replicas": 2, "replicas_up": 1}  # one is dead
    assert planner["rate_rps_60s"] == pytest.approx(3 / span, rel=0.05)  # the held call has not completed
    assert planner["latency_mean_s_60s"] > 0 and 0 < planner["ttft_mean_s_60s"] <= planner["latency_mean_s_60s"] * 3
    assert (coder["calls"], coder["errors"], coder["replicas_up"]) == (1, 1, 1)
    assert coder["rate_rps_60s"] == pytest.approx(1 / span, rel=0.05)
    assert coder["latency_mean_s_60s"] is None and coder["ttft_mean_s_60s"] is None  # failures have no latency


def test_call_window_forgets_calls_older_than_the_window_and_past_its_cap() -> None:
    def rec(latency: float, status: str = "ok", ttft: float | None = None) -> CallRecord:
        return CallRecord(request=None, llm="a", t_start=10.0, t_end=10.0 + latency,
                          t_first=None if ttft is None else 10.0 + ttft, status=status)

    w = CallWindow(window_s=60.0, max_calls=3)
    w.add(100.0, rec(4.0, ttft=1.0))
    w.add(130.0, rec(2.0))
    w.add(131.0, rec(9.0, status="error"))
    assert w.summary(131.0, 60.0) == {"rate_rps_60s": 3 / 60, "latency_mean_s_60s": 3.0, "ttft_mean_s_60s": 1.0}
    assert w.summary(190.5, 60.0) == {"rate_rps_60s": 1 / 60, "latency_mean_s_60s": None, "ttft_mean_s_60s": None}
    for t in (200.0, 201.0, 202.0, 203.0):
        w.add(t, rec(1.0))
    assert w.summary(203.0, 60.0)["rate_rps_60s"] == 3 / 3  # capped: the 3 calls since 200, not 4 in 60 s



async def test_a_gateway_with_no_llms_yet_serves_and_says_so(stack: Any) -> None:
    async with stack({}) as s:
        status, body = await s.post("/d/dep/v1/chat/completions", {"model": "planner", "messages": CHAT})
        st_models, models = await s.get("/v1/models")
        st_stats, stats = await s.get("/scepsy/v1/stats")
    assert status == 404 and body["error"]["message"] == (
        "unknown deployment 'dep'; this gateway serves no LLM yet (its endpoints file lists none)")
    assert (st_models, json.loads(models)["data"]) == (200, [])
    assert st_stats == 200 and json.loads(stats)["models"] == {}
