"""Draft → critique → revise loop in LangGraph, with a final formatter on a different LLM.

    run({"task": "...", "revisions": 2}, "http://host:port/v1")

Calls per request with R = input["revisions"]: writer 1 + R (one draft, R revisions),
critic 1 + R, formatter 1. The loop count is a counter in the graph state, so it is
deterministic. Model names are the workflow's LLM keys (writer, critic, formatter).
The key is $SCEPSY_API_KEY, else $OPENAI_API_KEY (`export OPENAI_API_KEY=$(scepsy keys show NAME)`).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import TypedDict

import openai
from langgraph.graph import END, START, StateGraph


class State(TypedDict):
    task: str
    draft: str
    critique: str
    revision: int
    max_revisions: int
    answer: str


@lru_cache(maxsize=1)
def _shared_client() -> openai.OpenAI:
    # Built once (~40 ms of TLS set-up); the sync client is thread-safe, requests take cheap views of it.
    return openai.OpenAI(api_key="EMPTY", base_url="http://unset/v1", max_retries=0)


def _complete(client: openai.OpenAI, model: str, prompt: str, max_tokens: int, role: str | None = None) -> str:
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        extra_headers={"X-Scepsy-Role": role} if role else None)
    return resp.choices[0].message.content or ""


def build_graph(client: openai.OpenAI):  # -> CompiledStateGraph
    """The agent's graph; nodes call the LLMs through `client`."""

    def draft(state: State) -> dict:
        return {"draft": _complete(client, "writer", f"Write a first draft for: {state['task']}",
                                   max_tokens=192, role="draft")}

    def critic(state: State) -> dict:
        return {"critique": _complete(client, "critic", f"Task: {state['task']}\nDraft:\n{state['draft']}\n"
                                      "List the draft's three worst problems.", max_tokens=96)}

    def revise(state: State) -> dict:
        text = _complete(client, "writer", f"Task: {state['task']}\nDraft:\n{state['draft']}\n"
                         f"Critique:\n{state['critique']}\nRewrite the draft fixing every problem.",
                         max_tokens=192, role="revise")
        return {"draft": text, "revision": state["revision"] + 1}

    def format_answer(state: State) -> dict:
        return {"answer": _complete(client, "formatter", f"Format as concise Markdown:\n{state['draft']}",
                                    max_tokens=128)}

    def after_critic(state: State) -> str:
        return "revise" if state["revision"] < state["max_revisions"] else "format"

    g = StateGraph(State)
    g.add_node("draft", draft)
    g.add_node("critic", critic)
    g.add_node("revise", revise)
    g.add_node("format", format_answer)
    g.add_edge(START, "draft")
    g.add_edge("draft", "critic")
    g.add_conditional_edges("critic", after_critic, {"revise": "revise", "format": "format"})
    g.add_edge("revise", "critic")
    g.add_edge("format", END)
    return g.compile()


def run(input: dict, base_url: str) -> str:
    """Draft, critique and revise input["task"] input["revisions"] times, then format the result."""
    revisions = int(input.get("revisions", 2))
    key = os.environ.get("SCEPSY_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    client = _shared_client().with_options(base_url=base_url, api_key=key)
    state = build_graph(client).invoke(
        {"task": input.get("task", "Explain continuous batching."), "draft": "", "critique": "",
         "revision": 0, "max_revisions": revisions, "answer": ""},
        {"recursion_limit": 4 * revisions + 10})
    return state["answer"]
