"""Tool calls and structured output of the sim engine over HTTP, read by the real openai SDK."""

from __future__ import annotations

import json

import openai
import pytest
from aiohttp import web

from scepsy_hpc.engine.openai_protocol import TOKEN_TEXT, text_tokens
from scepsy_hpc.engine.sim_server import SimEngineServer
from scepsy_hpc.perf.model import EngineConfig, EnginePerf

pytestmark = pytest.mark.timeout(30)

MODEL = "llama-3.2-1b-instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 2},
                                            "unit": {"type": "string", "enum": ["c", "f"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"query": {"type": "string"}, "top_k": {"type": "integer", "minimum": 1}},
          "required": ["query", "top_k"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "parameters": SEARCH}}]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
USER = [{"role": "user", "content": "what is the weather in paris?"}]
ALWAYS = {"X-Sim-Tool-Rate": "1"}


@pytest.fixture
async def sim(models, gpus):
    server = SimEngineServer(EnginePerf(EngineConfig(models[MODEL], gpus["h100-sxm"])), served_name="m",
                             time_scale=0.002, max_model_len=4096)
    runner = web.AppRunner(server.make_app(), access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        yield server, client
    await runner.cleanup()


def _arg_tokens(calls) -> int:
    return text_tokens("".join(c.function.name + c.function.arguments for c in calls))


async def test_a_tool_call_parses_in_the_sdk_and_is_valid_for_its_schema(sim, validate):
    server, c = sim
    r = await c.chat.completions.create(model="m", messages=USER, tools=TOOLS, extra_headers=ALWAYS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in SCHEMAS
    assert validate(json.loads(call.function.arguments), SCHEMAS[call.function.name]) == []
    assert r.usage.completion_tokens == _arg_tokens(choice.message.tool_calls)
    assert server.metrics.success["stop"] == 1  # vLLM's engine saw it stop
    assert server.metrics.generation_tokens == r.usage.completion_tokens


async def test_a_streamed_tool_call_accumulates_like_openais(sim, validate):
    server, c = sim
    stream = await c.chat.completions.create(model="m", messages=USER, tools=TOOLS, stream=True,
                                             stream_options={"include_usage": True}, parallel_tool_calls=True,
                                             extra_headers=ALWAYS)
    chunks = [ch async for ch in stream]
    calls: dict[int, dict] = {}
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            slot = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            if tc.id is not None:  # a call's first delta: id, type, the whole name, empty arguments
                assert tc.type == "function" and tc.function.arguments == "" and slot["arguments"] == ""
            slot["arguments"] += tc.function.arguments or ""
    assert calls and all(validate(json.loads(v["arguments"]), SCHEMAS[v["name"]]) == [] for v in calls.values())
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert reasons == ["tool_calls"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == text_tokens(
        "".join(v["name"] + v["arguments"] for v in calls.values()))
    assert server.metrics.generation_tokens == usage.completion_tokens


async def test_tool_choice_variants(sim):
    server, c = sim
    never = await c.chat.completions.create(model="m", messages=USER, tools=TOOLS, tool_choice="none",
                                            max_tokens=3, extra_headers=ALWAYS)
    assert never.choices[0].message.content == TOKEN_TEXT * 3 and not never.choices[0].message.tool_calls
    none_rate = await c.chat.completions.create(model="m", messages=USER, tools=TOOLS, max_tokens=2,
                                                extra_headers={"X-Sim-Tool-Rate": "0"})
    assert none_rate.choices[0].finish_reason == "length" and not none_rate.choices[0].message.tool_calls
    for _ in range(3):
        req = await c.chat.completions.create(model="m", messages=USER, tools=TOOLS, tool_choice="required",
                                              extra_headers={"X-Sim-Tool-Rate": "0"})
        assert len(req.choices[0].message.tool_calls) == 1
        named = await c.chat.completions.create(
            model="m", messages=USER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}})
        assert [t.function.name for t in named.choices[0].message.tool_calls] == ["search"]
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(model="m", messages=USER, tools=TOOLS,
                                        tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "'nope'" in info.value.message and "get_weather, search" in info.value.message


async def test_max_tokens_cuts_a_tool_call_with_finish_length(sim):
    server, c = sim
    r = await c.chat.completions.create(model="m", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=4)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    call = r.choices[0].message.tool_calls[0]
    assert len(call.function.name + call.function.arguments) == 16  # 4 tokens of 4 characters


async def test_response_format_json_schema_parses_in_the_sdk(sim, validate):
    server, c = sim
    from pydantic import BaseModel

    class Plan(BaseModel):
        steps: list[str]
        done: bool

    parsed = await c.chat.completions.parse(model="m", messages=USER, response_format=Plan)
    plan = parsed.choices[0].message.parsed
    assert isinstance(plan, Plan) and parsed.choices[0].finish_reason == "stop"
    assert parsed.usage.completion_tokens == text_tokens(parsed.choices[0].message.content)
    obj = await c.chat.completions.create(model="m", messages=USER, response_format={"type": "json_object"},
                                          stream=True, stream_options={"include_usage": True})
    chunks = [ch async for ch in obj]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert isinstance(json.loads(text), dict) and chunks[-1].usage.completion_tokens == text_tokens(text)
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) == text_tokens(text)


async def test_a_react_loop_ends(sim):
    """The default rate (0.5, halved after each round of tool results) ends a ReAct loop."""
    server, c = sim
    ended = 0
    for _ in range(10):
        msgs = list(USER)
        for _step in range(12):
            r = await c.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=20)
            m = r.choices[0].message
            if not m.tool_calls:
                ended += 1
                break
            msgs.append(m.model_dump(exclude_none=True))
            msgs += [{"role": "tool", "tool_call_id": t.id, "content": "sunny"} for t in m.tool_calls]
    assert ended == 10


async def test_bad_tools_are_a_400_through_the_sdk(sim):
    server, c = sim
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(model="m", messages=USER,
                                        tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}])
    assert "tools[0].function.parameters must be a JSON schema" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(model="m", messages=USER, response_format={"type": "xml"})
    assert "'xml' is not known" in info.value.message
