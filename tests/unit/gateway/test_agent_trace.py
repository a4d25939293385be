"""End to end through the real gateway and the sim engine: a ReAct turn with tool calls gives a tool
span and a prefix share in the trace; the request's state goes when its span ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from scepsy_hpc.engine.openai_protocol import chat_token_ids
from scepsy_hpc.engine.sim_server import SimEngineServer
from scepsy_hpc.gateway import start_gateway
from scepsy_hpc.perf.model import EngineConfig, EnginePerf
from scepsy_hpc.trace.records import read_trace

pytestmark = pytest.mark.timeout(20)

SMALL = "llama-3.2-1b-instruct"
TOOLS = [{"type": "function", "function": {"name": "search", "description": "web search",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
SYSTEM = {"role": "system", "content": "You are a careful research agent. " * 20}


def _common(a: list[Any], b: list[Any]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


async def _call(http: aiohttp.ClientSession, url: str, body: dict[str, Any], rid: str) -> dict[str, Any]:
    """The assistant message of a call (streamed ones put together from their deltas)."""
    async with http.post(url + "/v1/chat/completions", json=body, headers={"X-Scepsy-Request": rid}) as r:
        assert r.status == 200, await r.text()
        if not body.get("stream"):
            return (await r.json())["choices"][0]["message"]
        msg: dict[str, Any] = {"role": "assistant", "content": None}
        calls: dict[int, dict[str, Any]] = {}
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                for tc in c["delta"].get("tool_calls") or []:
                    slot = calls.setdefault(tc["index"], {"id": tc.get("id"), "type": "function",
                                                          "function": {"name": "", "arguments": ""}})
                    slot["function"]["name"] += tc.get("function", {}).get("name") or ""
                    slot["function"]["arguments"] += tc.get("function", {}).get("arguments") or ""
                if c["delta"].get("content"):
                    msg["content"] = (msg["content"] or "") + c["delta"]["content"]
        if calls:
            msg["tool_calls"] = [calls[i] for i in sorted(calls)]
        return msg


@pytest.mark.parametrize("stream", [False, True])
async def test_a_react_turn_gives_a_tool_span_and_prefix_shares(tmp_path: Path, models: Any, gpus: Any,
                                                                 stream: bool) -> None:
    server = SimEngineServer(EnginePerf(EngineConfig(models[SMALL], gpus["h100-sxm"])), served_name=SMALL,
                             time_scale=0.001, max_model_len=8192, tool_call_rate=1.0, default_output_tokens=8)
    runner = web.AppRunner(server.make_app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    eng = f"http://127.0.0.1:{runner.addresses[0][1]}"
    ep = tmp_path / "endpoints.yaml"
    ep.write_text(f"llms:\n  agent:\n    served_model: {SMALL}\n    replicas: [{eng}]\n")
    gw = await start_gateway(ep, tmp_path / "trace.jsonl", watch_interval_s=0.0, shutdown_timeout_s=1.0)
    try:
        async with aiohttp.ClientSession(trust_env=False) as http:
            m1 = [SYSTEM, {"role": "user", "content": "Who wrote the paper on scepsis?"}]
            a1 = await _call(http, gw.url, {"model": "agent", "messages": m1, "tools": TOOLS, "stream": stream}, "R")
            assert a1.get("tool_calls"), a1
            results = [{"role": "tool", "tool_call_id": tc["id"], "content": "found: " + tc["function"]["name"]}
                       for tc in a1["tool_calls"]]
            m2 = m1 + [a1] + results
            await _call(http, gw.url, {"model": "agent", "messages": m2, "tools": TOOLS, "max_tokens": 4,
                                       "stream": stream}, "R")
            # another request with the same system prompt and tools
            await _call(http, gw.url, {"model": "agent", "messages": [SYSTEM, {"role": "user", "content": "Other q"}],
                                       "tools": TOOLS, "max_tokens": 4, "stream": stream}, "S")
            for rid in ("R", "S"):
                for event in ("start", "end"):
                    async with http.post(gw.url + "/scepsy/v1/spans",
                                         json={"span": "request", "event": event, "request": rid}) as r:
                        assert r.status == 200
            st = gw.state
            assert st.tracker.prefixes._requests == {} and st.tracker.tools.pending == 0
            assert st.router.affinity_size() == 0   # (affinity off by default: nothing held either way)
    finally:
        await gw.close()
        await runner.cleanup()
    trace = read_trace(tmp_path / "trace.jsonl")
    c1, c2, c3 = trace.calls
    # turn 2 shares turn 1's prompt and answer (as re-sent), in whole 16-token blocks; the sim engine's
    # prompt_tokens agree with the gateway's estimate, so no scaling
    ids1 = chat_token_ids(m1 + [a1], TOOLS)
    ids2 = chat_token_ids(m2, TOOLS)
    assert c2.prompt_tokens == len(ids2)
    assert c1.prefix_tokens == 0 and c2.prefix_tokens == _common(ids1, ids2) // 16 * 16
    assert c2.prefix_tokens > len(chat_token_ids(m1, TOOLS)) - 16   # more than turn 1's prompt alone
    # request S shares the tools and system turn (and the user's role markers) with R
    ids3 = chat_token_ids([SYSTEM, {"role": "user", "content": "Other q"}], TOOLS)
    assert c3.prefix_tokens == 0 and c3.system_tokens == _common(ids3, chat_token_ids(m1, TOOLS)) // 16 * 16 > 0
    tools = [s for s in trace.spans if s.span == "tool"]
    assert sorted(s.name or "" for s in tools) == sorted(tc["function"]["name"] for tc in a1["tool_calls"])
    assert all((s.request, s.t_start, s.t_end, s.status) == ("R", c1.t_end, c2.t_start, "ok") for s in tools)
