"""Research fan-out with the plain `openai` SDK: plan, search k subtopics in parallel, write.

    run({"question": "...", "subtopics": 3}, "http://host:port/v1")

Calls per request: 1 planner + k searcher (k = input["subtopics"]) + 1 writer. The model names
are the workflow's LLM keys (planner, searcher, writer): the scepsy gateway maps them to its
engines; against a bare server, serve each model under that name (vLLM --served-model-name).
The key is $SCEPSY_API_KEY, else $OPENAI_API_KEY (`export OPENAI_API_KEY=$(scepsy keys show NAME)`).
"""

from __future__ import annotations

import asyncio
import os
import weakref

import openai

SEARCH_LATENCY_S = 0.8  # a typical web-search API round trip


# One client (connection pool) per event loop: building one costs ~40 ms of TLS set-up, which would
# stall every request in flight; each request then gets a cheap view with its own base URL.
_CLIENTS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, openai.AsyncOpenAI]" = weakref.WeakKeyDictionary()


def api_key() -> str:
    """The gateway's client key: $SCEPSY_API_KEY, else $OPENAI_API_KEY (a bare engine may need none)."""
    return os.environ.get("SCEPSY_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"


def client_for(base_url: str) -> openai.AsyncOpenAI:
    """An async client for `base_url` sharing this event loop's connection pool."""
    loop = asyncio.get_running_loop()
    if loop not in _CLIENTS:
        _CLIENTS[loop] = openai.AsyncOpenAI(base_url=base_url, api_key=api_key(), max_retries=0)
    return _CLIENTS[loop].with_options(base_url=base_url, api_key=api_key())


def _time_scale() -> float:
    # Against simulated engines paced at time scale s, a tool must be paced alike to keep the ratio.
    return float(os.environ.get("SCEPSY_TIME_SCALE", "1"))


async def web_search(query: str) -> str:
    """Stand-in for a search API: waits like one and returns canned snippets."""
    await asyncio.sleep(SEARCH_LATENCY_S * _time_scale())
    return "\n".join(f"[{i}] A source discussing {query}." for i in range(1, 4))


async def _complete(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int,
                    role: str | None = None) -> str:
    resp = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        extra_headers={"X-Scepsy-Role": role} if role else None)
    return resp.choices[0].message.content or ""


async def search(client: openai.AsyncOpenAI, question: str, subtopic: str) -> str:
    """One searcher lane: a web search, then a summary of its results."""
    results = await web_search(subtopic)
    return await _complete(client, "searcher", f"Question: {question}\nSubtopic: {subtopic}\n"
                           f"Summarise what these sources say:\n{results}", max_tokens=96, role="search")


async def run(input: dict, base_url: str) -> str:
    """Answer input["question"] by researching input["subtopics"] subtopics in parallel."""
    question = input.get("question", "What limits the throughput of LLM serving?")
    k = int(input.get("subtopics", 3))
    client = client_for(base_url)
    plan = await _complete(client, "planner", f"Split this question into {k} research subtopics, "
                           f"one per line:\n{question}", max_tokens=128, role="plan")
    lines = [ln.strip() for ln in plan.splitlines() if ln.strip()]
    # The plan's text decides the wording, never the count: k lanes, padded if the model gave fewer.
    subtopics = (lines + [f"{question} (aspect {i + 1})" for i in range(k)])[:k]
    notes = await asyncio.gather(*(search(client, question, s) for s in subtopics))
    body = "\n\n".join(f"## {s}\n{n}" for s, n in zip(subtopics, notes))
    return await _complete(client, "writer", f"Write a short report answering: {question}\n\n"
                           f"Research notes:\n{body}", max_tokens=256)
