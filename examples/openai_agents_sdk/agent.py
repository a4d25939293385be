"""A tool-using assistant on the OpenAI Agents SDK, served by any chat-completions endpoint.

    run({"request": "...", "max_turns": 6}, "http://host:port/v1")

`agents.Agent` with three `function_tool`s, run by `Runner.run`. The model is
`OpenAIChatCompletionsModel` over an `AsyncOpenAI(base_url=...)` client, so the SDK speaks chat
completions (not the Responses API) and works against vLLM, SGLang or the scepsy gateway; its tracing
export to OpenAI is switched off (`set_tracing_disabled`), so nothing leaves the machine. Each turn is
one `assistant` LLM call; a turn that asks for tools runs them here and sends their results in the next
turn. Calls per request: 1 + the number of tool turns (the model decides; `max_turns` bounds it).
The key is $SCEPSY_API_KEY, else $OPENAI_API_KEY (`export OPENAI_API_KEY=$(scepsy keys show NAME)`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import weakref

import openai
from agents import (Agent, MaxTurnsExceeded, ModelSettings, OpenAIChatCompletionsModel, Runner, ToolCallItem,
                    ToolCallOutputItem, function_tool, set_tracing_disabled)

set_tracing_disabled(True)  # the SDK would otherwise upload traces to api.openai.com

INSTRUCTIONS = ("You are a travel desk assistant. Use the tools for weather, currency and dates; never invent "
                "a rate or a forecast. Answer briefly once you have the facts.")

# --- tools ---------------------------------------------------------------------------------------------------

_WEATHER = {"paris": (14, "light rain"), "tokyo": (22, "clear"), "lima": (19, "overcast"),
            "oslo": (3, "snow"), "cairo": (31, "sunny")}
_EUR_PER = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "JPY": 0.0061, "CHF": 1.04}


@function_tool
def get_weather(city: str) -> str:
    """Today's weather in a city.

    Args:
        city: The city's name, e.g. "Paris".
    """
    key = city.strip().lower()
    if key not in _WEATHER:
        return f"error: no forecast for {city!r}; cities: {', '.join(c.title() for c in _WEATHER)}"
    temp, sky = _WEATHER[key]
    return f"{city.strip().title()}: {temp} °C, {sky}"


@function_tool
def convert_currency(amount: float, from_currency: str, to_currency: str) -> str:
    """Convert money between currencies at today's reference rate.

    Args:
        amount: The amount in from_currency (not negative).
        from_currency: ISO code, one of EUR, USD, GBP, JPY, CHF.
        to_currency: ISO code, one of EUR, USD, GBP, JPY, CHF.
    """
    a, b = from_currency.strip().upper(), to_currency.strip().upper()
    if a not in _EUR_PER or b not in _EUR_PER:
        return f"error: unknown currency; known: {', '.join(_EUR_PER)}"
    if not 0 <= amount < 1e12:
        return "error: amount must be between 0 and 1e12"
    return f"{amount:.2f} {a} = {amount * _EUR_PER[a] / _EUR_PER[b]:.2f} {b}"


@function_tool
def days_until(date: str) -> str:
    """Days from today until a date.

    Args:
        date: The date as YYYY-MM-DD.
    """
    try:
        target = dt.date.fromisoformat(date.strip())
    except ValueError:
        return f"error: {date!r} is not a YYYY-MM-DD date"
    return f"{(target - dt.date.today()).days} days until {target.isoformat()}"


# --- the agent -----------------------------------------------------------------------------------------------

_CLIENTS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, openai.AsyncOpenAI]" = weakref.WeakKeyDictionary()


def api_key() -> str:
    """The gateway's client key: $SCEPSY_API_KEY, else $OPENAI_API_KEY (a bare engine may need none)."""
    return os.environ.get("SCEPSY_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"


def client_for(base_url: str) -> openai.AsyncOpenAI:
    """An async client for `base_url` sharing this event loop's connection pool (one TLS set-up per loop)."""
    loop = asyncio.get_running_loop()
    if loop not in _CLIENTS:
        _CLIENTS[loop] = openai.AsyncOpenAI(base_url=base_url, api_key=api_key(), max_retries=0)
    return _CLIENTS[loop].with_options(base_url=base_url, api_key=api_key())


def build_agent(base_url: str) -> Agent:
    """The assistant, its model the workflow's LLM key `assistant` behind `base_url`."""
    model = OpenAIChatCompletionsModel(model="assistant", openai_client=client_for(base_url))
    return Agent(name="travel desk", instructions=INSTRUCTIONS, model=model,
                 tools=[get_weather, convert_currency, days_until],
                 model_settings=ModelSettings(max_tokens=64, temperature=0))


async def run(input: dict, base_url: str) -> dict:
    """Serve input["request"] in at most input["max_turns"] turns; returns the answer and the tool calls made
    (name, arguments, output)."""
    agent = build_agent(base_url)
    try:
        result = await Runner.run(agent, input.get("request", "Is it warm in Lima today, and what is 100 USD in EUR?"),
                                  max_turns=int(input.get("max_turns", 6)))
        items, answer = result.new_items, str(result.final_output)
    except MaxTurnsExceeded as exc:
        data = exc.run_data
        items, answer = (data.new_items if data else []), "stopped: turn limit reached"
    outputs = {_field(i.raw_item, "call_id"): i.output for i in items if isinstance(i, ToolCallOutputItem)}
    calls = [{"name": _field(i.raw_item, "name"), "arguments": _field(i.raw_item, "arguments"),
              "output": outputs.get(_field(i.raw_item, "call_id"))} for i in items if isinstance(i, ToolCallItem)]
    return {"answer": answer, "tool_calls": calls}


def _field(raw: object, name: str) -> object:
    # The SDK's raw items are pydantic models or TypedDicts depending on the item kind.
    return raw.get(name) if isinstance(raw, dict) else getattr(raw, name, None)
