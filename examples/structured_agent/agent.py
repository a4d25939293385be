"""A plan-and-execute agent on structured output: every answer is JSON parsed into a pydantic model.

    run({"goal": "...", "max_steps": 3}, "http://host:port/v1")

The `planner` LLM returns a `Plan` (1 to max_steps steps), each step goes to the `worker` LLM in
parallel and comes back as a `StepResult`, and the `reviewer` LLM judges them as a `Review`. Each call
sends `response_format` json_schema (the openai SDK's `chat.completions.parse` with a pydantic model)
and the SDK parses the answer into that model; an answer that does not parse fails the request, as
it would in production. Calls per request: 1 planner + k worker (k = the plan's steps) + 1 reviewer.
The key is $SCEPSY_API_KEY, else $OPENAI_API_KEY (`export OPENAI_API_KEY=$(scepsy keys show NAME)`).
"""

from __future__ import annotations

import asyncio
import os
import weakref
from typing import Literal, TypeVar

import openai
from pydantic import BaseModel, Field


T = TypeVar("T", bound=BaseModel)


class PlanStep(BaseModel):
    title: str = Field(max_length=80)
    kind: Literal["research", "compute", "write"]
    depends_on_previous: bool


class Plan(BaseModel):
    goal: str = Field(max_length=120)
    steps: list[PlanStep] = Field(min_length=1, max_length=4)


class StepResult(BaseModel):
    summary: str = Field(max_length=200)
    confidence: float = Field(ge=0, le=1)
    done: bool


class Review(BaseModel):
    verdict: Literal["accept", "revise"]
    weakest_step: int = Field(ge=0, le=3)
    comment: str = Field(max_length=160)


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


async def ask(client: openai.AsyncOpenAI, model: str, system: str, user: str, schema: type[T],
              max_tokens: int) -> T:
    """One structured call: the answer parsed into `schema` (ValueError if the model gave none)."""
    resp = await client.chat.completions.parse(
        model=model, messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        response_format=schema, max_tokens=max_tokens, temperature=0)
    msg = resp.choices[0].message
    if msg.parsed is None:
        raise ValueError(f"{model}: no {schema.__name__} in the answer (refusal: {msg.refusal!r})")
    return msg.parsed


async def run(input: dict, base_url: str) -> dict:
    """Plan input["goal"] in at most input["max_steps"] steps, execute them, review; returns every parsed
    answer (plan, one result per step, review)."""
    goal = input.get("goal", "Estimate the GPU memory a 7B model needs for 32 concurrent chats.")
    max_steps = max(1, min(4, int(input.get("max_steps", 3))))
    client = client_for(base_url)
    plan = await ask(client, "planner", "You plan work. Answer with JSON only.",
                     f"Goal: {goal}\nPlan it in at most {max_steps} steps.", Plan, max_tokens=256)
    steps = plan.steps[:max_steps]  # the model may plan more than asked: the program keeps its own bound
    results = await asyncio.gather(*(
        ask(client, "worker", "You execute one step of a plan. Answer with JSON only.",
            f"Goal: {goal}\nStep {i + 1} ({s.kind}): {s.title}", StepResult, max_tokens=128)
        for i, s in enumerate(steps)))
    report = "\n".join(f"{i}. {s.title}: {r.summary} (confidence {r.confidence:.2f})"
                       for i, (s, r) in enumerate(zip(steps, results)))
    review = await ask(client, "reviewer", "You review a finished plan. Answer with JSON only.",
                       f"Goal: {goal}\nResults:\n{report}", Review, max_tokens=96)
    return {"plan": plan, "results": results, "review": review}
