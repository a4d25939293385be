"""Continuity through the real gateway: calls hold while an LLM has no replica that can take them, a
refused connection is retried until the engine is back, and a removed replica drains (visible in stats)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from scepsy_hpc.engine.sim_server import SimEngineServer
from scepsy_hpc.perf.model import EngineConfig, EnginePerf

# gateway scenarios take well under a second: a hang fails here instead of blocking the suite
pytestmark = pytest.mark.timeout(15)

CHAT = [{"role": "user", "content": "hi"}]
SMALL = "llama-3.2-1b-instruct"


def _endpoints(urls: dict[str, list[str]]) -> str:
    """An endpoints file; the LLM "small" is the sim engine's model."""
    lines = ["time_scale: 1.0", "llms:"]
    for name, us in urls.items():
        lines += [f"  {name}:", f"    replicas: [{', '.join(us)}]"]
        if name == "small":
            lines.append(f"    served_model: {SMALL}")
    return "\n".join(lines) + "\n"


async def _stats(s: Any) -> dict[str, Any]:
    """GET the stats (which also makes the gateway read a just-written endpoints file)."""
    status, text = await s.get("/scepsy/v1/stats")
    assert status == 200
    return json.loads(text)


class SimEngine:
    """Our simulated engine in the test's loop, on a port that can be closed and served again."""

    def __init__(self, perf: EnginePerf, time_scale: float) -> None:
        self.perf, self.time_scale = perf, time_scale
        self.port = 0
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> str:
        server = SimEngineServer(self.perf, served_name=SMALL, time_scale=self.time_scale, max_model_len=4096)
        self.runner = web.AppRunner(server.make_app(), access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def sim_engine(models: Any, gpus: Any) -> AsyncIterator[SimEngine]:
    eng = SimEngine(EnginePerf(EngineConfig(models[SMALL], gpus["h100-sxm"])), time_scale=0.001)
    try:
        yield eng
    finally:
        await eng.stop()


async def test_a_call_holds_while_the_pool_is_empty_and_succeeds_when_it_is_refilled(stack: Any) -> None:
    async with stack({"planner": 1}, hold_s=5.0) as s:
        url = s.engines["planner"][0].url
        s.write_endpoints(_endpoints({"planner": []}))   # e.g. its only engine restarts
        assert (await _stats(s))["models"]["planner"]["replicas"] == 0
        t0 = time.monotonic()
        call = asyncio.create_task(s.post("/r/r-1/v1/chat/completions", {"model": "planner", "messages": CHAT}))
        pool = s.gw.state.router.pool("planner")
        await s.until(lambda: pool.held_count() == 1)
        held = (await _stats(s))["models"]["planner"]
        s.write_endpoints(_endpoints({"planner": [url]}))
        await _stats(s)
        status, body = await call
        after = (await _stats(s))["models"]["planner"]
        trace = await s.close_gateway()
    assert status == 200 and body["choices"][0]["message"]["content"] == "Hello world"
    assert time.monotonic() - t0 < 2.0   # went as soon as the file named a replica, not at the end of the hold
    assert (held["held"], held["queued"], held["held_calls"]) == (1, 0, 1)
    assert (after["held"], after["held_calls"], after["hold_timeouts"], after["errors"]) == (0, 1, 0, 0)
    assert [(c.status, c.replica) for c in trace.calls] == [("ok", url)]


async def test_a_hold_that_runs_out_is_a_503_saying_how_long_it_waited(stack: Any) -> None:
    async with stack({"planner": 0}, hold_s=0.2) as s:
        t0 = time.monotonic()
        status, body = await s.post("/r/r-1/v1/chat/completions", {"model": "planner", "messages": CHAT})
        waited = time.monotonic() - t0
        stats = (await _stats(s))["models"]["planner"]
        _, metrics = await s.get("/metrics")
        trace = await s.close_gateway()
    assert status == 503 and waited >= 0.2
    assert body == {"error": {"message": "waited 0.2 s for a replica of llm 'planner'; the endpoints file lists none",
                              "type": "upstream_unavailable", "code": 503}}
    assert (stats["held_calls"], stats["hold_timeouts"], stats["errors"]) == (1, 1, 1)
    assert 'scepsy_gateway_hold_timeouts_total{llm="planner"} 1.0' in metrics
    assert 'scepsy_gateway_held_calls_total{llm="planner"} 1.0' in metrics
    assert [(c.status, c.http_status) for c in trace.calls] == [("error", 503)]


async def test_a_hold_of_zero_fails_an_empty_pool_at_once(stack: Any) -> None:
    async with stack({"planner": 0}, hold_s=0) as s:
        status, body = await s.post("/v1/chat/completions", {"model": "planner", "messages": CHAT})
    assert status == 503 and body["error"]["message"] == "llm 'planner' has no replicas in the endpoints file"


async def test_an_llm_removed_from_the_file_fails_its_held_calls_at_once(stack: Any) -> None:
    async with stack({"planner": 0, "coder": 1}, hold_s=10.0) as s:
        call = asyncio.create_task(s.post("/v1/chat/completions", {"model": "planner", "messages": CHAT}))
        pool = s.gw.state.router.pool("planner")
        await s.until(lambda: pool.held_count() == 1)
        s.write_endpoints(_endpoints({"coder": [s.engines["coder"][0].url]}))
        t0 = time.monotonic()
        await _stats(s)
        status, body = await call
    assert time.monotonic() - t0 < 2.0
    assert status == 503 and "was removed from the endpoints file" in body["error"]["message"]


async def test_an_only_replica_that_keeps_refusing_is_a_503_after_the_hold_naming_it(stack: Any) -> None:
    async with stack({"planner": 0}, dead={"planner": 1}, hold_s=0.3, down_for_s=0.05) as s:
        dead = s.gw.state.router.pool("planner").replicas[0]
        status, body = await s.post("/v1/chat/completions", {"model": "planner", "messages": CHAT})
        before = time.monotonic()
        stats = await _stats(s)
        after = time.monotonic()
    assert status == 503
    assert body["error"]["message"] == ("waited 0.3 s for a replica of llm 'planner'; every replica refused connections "
                                        f"(last tried: {dead.url} unreachable (connection refused))")
    assert 3 <= dead.connect_failures <= 10   # tried again after each down period, not in a hot loop
    # down for 0.05 s after its last refusal: the stats say so unless that period ended before they were read
    # (a loaded machine can take that long between the 503 and the stats call)
    [state] = _states(stats["models"]["planner"])
    assert state == {"url": dead.url, "outstanding": 0, "active": True, "down": state["down"]}
    assert (before < dead.down_until) if state["down"] else (after >= dead.down_until)
    assert stats["models"]["planner"]["replica_states"][0]["calls"] >= 3   # each try routed to it counts


async def test_an_engine_that_refuses_connections_then_returns_on_its_port_fails_no_call(
        stack: Any, sim_engine: SimEngine) -> None:
    url = await sim_engine.start()
    await sim_engine.stop()   # the port is closed: connections are refused, as while an engine restarts
    async with stack({}, hold_s=5.0, down_for_s=0.05) as s:
        s.write_endpoints(_endpoints({"small": [url]}))
        await _stats(s)

        async def unary(i: int) -> str:
            status, body = await s.post(f"/r/u{i}/v1/completions", {"model": "small", "prompt": "x", "max_tokens": 4})
            assert status == 200, body
            return body["choices"][0]["finish_reason"]

        async def stream(i: int) -> list[bytes]:
            assert s.http is not None
            async with s.http.post(s.url + f"/r/s{i}/v1/completions",
                                   json={"model": "small", "prompt": "x", "max_tokens": 5, "stream": True}) as resp:
                assert resp.status == 200
                return [e async for e in s.sse_events(resp)]

        calls = [asyncio.create_task(unary(i)) for i in range(3)] + [asyncio.create_task(stream(i)) for i in range(3)]
        pool = s.gw.state.router.pool("small")
        await s.until(lambda: pool.held_count() == 6 and pool.replicas[0].connect_failures >= 2)
        await sim_engine.start()   # back on the same port
        results = await asyncio.gather(*calls)
        stats = (await _stats(s))["models"]["small"]
        trace = await s.close_gateway()
    assert results[:3] == ["length"] * 3
    for events in results[3:]:
        assert len(events) == 6 and events[-1] == b"[DONE]"   # five tokens, then the end
    assert [c.status for c in trace.calls] == ["ok"] * 6
    assert (stats["errors"], stats["hold_timeouts"], stats["held_calls"]) == (0, 0, 6)


async def test_a_removed_replica_drains_its_stream_and_stats_show_it_until_done(stack: Any) -> None:
    async with stack({"planner": 2}) as s:
        for eng in s.engines["planner"]:
            eng.chunk_gate = asyncio.Semaphore(0)
        assert s.http is not None
        async with s.http.post(s.url + "/r/r-1/v1/chat/completions",
                               json={"model": "planner", "messages": CHAT, "stream": True}) as resp:
            events = s.sse_events(resp)
            got = [await events.__anext__()]   # the role chunk: the stream is in flight
            (old,) = [e for e in s.engines["planner"] if e.active]
            (new,) = [e for e in s.engines["planner"] if e is not old]
            s.write_endpoints(_endpoints({"planner": [new.url]}))   # the cut-over: `old` is drained
            draining = await _stats(s)
            new.chunk_gate = None
            status, _ = await s.post("/r/r-2/v1/chat/completions", {"model": "planner", "messages": CHAT})
            for _ in old.tokens:
                old.chunk_gate.release()
            got += [e async for e in events]
        done = await _stats(s)
        trace = await s.close_gateway()
    assert draining["draining"] == {old.url: 1}
    planner = draining["models"]["planner"]
    assert (planner["replicas"], planner["outstanding"]) == (1, 0)   # `replicas` counts the file's, as before
    assert _states(planner) == [{"url": new.url, "outstanding": 0, "active": True, "down": False},
                                {"url": old.url, "outstanding": 1, "active": False, "down": False}]
    assert status == 200 and len(new.calls) == 1 and len(old.calls) == 1   # the new call went to the kept replica
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in got[:-1]
                   if json.loads(e)["choices"])
    assert text == "Hello world" and got[-1] == b"[DONE]"   # the drained stream completed in full
    assert done["draining"] == {}
    assert _states(done["models"]["planner"]) == [
        {"url": new.url, "outstanding": 0, "active": True, "down": False}]
    assert [(r["weight"], r["calls"]) for r in done["models"]["planner"]["replica_states"]] == [(1.0, 1)]
    assert sorted((c.request, c.status, c.replica) for c in trace.calls) == [("r-1", "ok", old.url),
                                                                            ("r-2", "ok", new.url)]


async def test_a_stream_on_a_removed_sim_engine_completes_in_full(stack: Any, sim_engine: SimEngine) -> None:
    sim_engine.time_scale = 1.0   # real time: the stream runs long enough to be seen draining
    url = await sim_engine.start()
    async with stack({}) as s:
        s.write_endpoints(_endpoints({"small": [url]}))
        await _stats(s)
        assert s.http is not None
        async with s.http.post(s.url + "/v1/completions",
                               json={"model": "small", "prompt": "x", "max_tokens": 200, "stream": True}) as resp:
            events = s.sse_events(resp)
            got = [await events.__anext__()]
            s.write_endpoints(_endpoints({"small": []}))
            during = await _stats(s)
            got += [e async for e in events]
        after = await _stats(s)
    assert during["draining"] == {url: 1} and during["models"]["small"]["replicas"] == 0
    assert len(got) == 201 and got[-1] == b"[DONE]"
    assert sum(len(json.loads(e)["choices"]) for e in got[:-1]) == 200
    assert after["draining"] == {}


async def test_stats_read_a_just_written_endpoints_file(stack: Any) -> None:
    async with stack({"planner": 1}) as s:
        s.gw.state.source.min_interval_s = 3600.0   # the gateway would otherwise look at the file only hourly
        s.write_endpoints(_endpoints({"planner": [], "coder": [s.engines["planner"][0].url]}))
        _, health = await s.get("/health")
        stats = await _stats(s)
    assert json.loads(health)["llms"] == ["planner"]   # rate-limited: not looked at yet
    assert {k: m["replicas"] for k, m in stats["models"].items()} == {"coder": 1, "planner": 0}


def _states(model: dict[str, Any]) -> list[dict[str, Any]]:
    """A model's replica_states without the routing figures (weight, calls) tested on their own."""
    return [{k: r[k] for k in ("url", "outstanding", "active", "down")} for r in model["replica_states"]]
