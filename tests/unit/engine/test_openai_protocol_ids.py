"""Pseudo-token ids of prompts: as many as the token count, shared exactly where the text agrees."""

from __future__ import annotations

from scepsy_hpc.engine.openai_protocol import (
    chat_prompt_tokens, chat_token_ids, completion_prompt_tokens, completion_token_ids,
)

TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}]


def _common(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_ids_count_like_the_token_count():
    for msgs, tools in [([{"role": "user", "content": "hello there, how are you?"}], None),
                        ([{"role": "system", "content": "x" * 401}, {"role": "user", "content": ""}], TOOLS),
                        ([{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                          "function": {"name": "search", "arguments": "{}"}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "found"}]}], TOOLS)]:
        assert len(chat_token_ids(msgs, tools)) == chat_prompt_tokens(msgs, tools)
    for prompt in ("abcdefghi", [1, 2, 3], ["one prompt"], [[5, 6]]):
        assert len(completion_token_ids(prompt)) == completion_prompt_tokens(prompt)


def test_a_continued_conversation_shares_its_history():
    sys = {"role": "system", "content": "You are a careful agent. " * 20}
    turn1 = [sys, {"role": "user", "content": "What is the capital of France?"}]
    turn2 = turn1 + [{"role": "assistant", "content": "Let me look it up."}, {"role": "user", "content": "ok"}]
    a, b = chat_token_ids(turn1, TOOLS), chat_token_ids(turn2, TOOLS)
    assert _common(a, b) == len(a)
    other = chat_token_ids([sys, {"role": "user", "content": "Something else entirely"}], TOOLS)
    shared = _common(a, other)
    assert len(chat_token_ids([sys], TOOLS)) + 4 <= shared < len(a)   # the tools, the system turn, the user markers
    assert _common(chat_token_ids(turn1), chat_token_ids([{"role": "user", "content": sys["content"]}])) == 0
