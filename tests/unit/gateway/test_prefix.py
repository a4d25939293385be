"""Prefix accounting (PrefixBook), answers as the next prompt sees them (Answer), inferred tool spans
(ToolBook): hand-computed cases and the memory bounds."""

from __future__ import annotations

import json

from scepsy_hpc.engine.openai_protocol import chat_prompt_tokens, chat_token_ids
from scepsy_hpc.gateway.prefix import Answer, PrefixBook, Prompt, chat_token_text, scaled
from scepsy_hpc.gateway.tracing import ToolBook

SYS = {"role": "system", "content": "S" * 40}       # 4 role tokens + 40/4 = 10 text tokens = 14
U1 = {"role": "user", "content": "abcdefgh"}       # 4 + 2 = 6
A1 = {"role": "assistant", "content": "ok12"}      # 4 + 1 = 5 (the answer of turn 1)
U2 = {"role": "user", "content": "ijkl"}           # 4 + 1 = 5
A2 = {"role": "assistant", "content": "done"}      # 4 + 1 = 5
U3 = {"role": "user", "content": "mn"}             # 4 + 1 (ceil(2/4)) = 5


def _answer(content: str) -> Answer:
    a = Answer()
    a.take_body({"choices": [{"message": {"role": "assistant", "content": content}}]})
    return a


def test_token_text_is_the_engines_tokens_four_characters_each() -> None:
    msgs = [SYS, U1, {"role": "assistant", "content": None, "tool_calls": [{"id": "t1", "function": {"name": "f"}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "x" * 7}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert len(chat_token_text(msgs, tools)) == 4 * len(chat_token_ids(msgs, tools)) == 4 * chat_prompt_tokens(msgs, tools)


def test_a_three_turn_conversation_with_a_system_prompt_shared_by_another_request() -> None:
    book = PrefixBook(block_tokens=1)   # one token a block: exact counts
    p1 = book.prompt({"messages": [SYS, U1]}, chat=True)
    assert p1 is not None and p1.est_tokens == 14 + 6
    # turn 1: nothing earlier, no other request
    assert book.observe("A", "A", "m", p1) == (0, 0)
    book.answered("A", "m", p1, _answer("ok12"))
    # turn 2 re-sends turn 1's prompt and answer: 20 + 5 = 25 shared, of 30
    p2 = book.prompt({"messages": [SYS, U1, A1, U2]}, chat=True)
    assert p2 is not None and p2.est_tokens == 30
    assert book.observe("A", "A", "m", p2) == (25, 0)
    book.answered("A", "m", p2, _answer("done"))
    # request B: the system turn (14) and the user's role markers (4) agree with A's prompts; "zzzz" does not
    pb = book.prompt({"messages": [SYS, {"role": "user", "content": "zzzz"}]}, chat=True)
    assert book.observe("B", "B", "m", pb) == (0, 18)
    # turn 3 of A: turn 2's prompt (30) + its answer (5) = 35 shared; with B it shares the same 18
    p3 = book.prompt({"messages": [SYS, U1, A1, U2, A2, U3]}, chat=True)
    assert p3 is not None and p3.est_tokens == 40
    assert book.observe("A", "A", "m", p3) == (35, 18)
    # another LLM shares nothing with m
    assert book.observe("A", "A", "other", p3) == (0, 0)


def test_counts_are_whole_blocks_of_16() -> None:
    book = PrefixBook()   # 16-token blocks
    p1 = book.prompt({"messages": [SYS, U1]}, chat=True)     # 20 tokens: 1 full block
    book.observe("A", "A", "m", p1)
    book.answered("A", "m", p1, _answer("ok12"))             # 25 tokens: still 1 full block
    p2 = book.prompt({"messages": [SYS, U1, A1, U2]}, chat=True)   # 30 tokens shared 25 -> 16
    assert book.observe("A", "A", "m", p2) == (16, 0)


def test_shared_counts_scale_to_the_engines_prompt_tokens() -> None:
    assert scaled(25, 30, 60) == 50      # a real tokenizer counts twice as many: 25/30 of 60
    assert scaled(25, 30, 30) == 25
    assert scaled(30, 30, 7) == 7        # never over the prompt
    assert scaled(None, 30, 60) is None and scaled(5, 30, None) == 5


def test_a_call_without_a_request_has_no_prefix_but_a_system_share() -> None:
    book = PrefixBook(block_tokens=1)
    p = book.prompt({"messages": [SYS, U1]}, chat=True)
    assert book.observe(None, "c-1", "m", p) == (None, 0)
    assert book.observe(None, "c-2", "m", p) == (None, 20)


def test_completions_prompts_are_compared_too() -> None:
    book = PrefixBook(block_tokens=1)
    p1 = book.prompt({"prompt": "Q: abcd"}, chat=False)   # 2 tokens
    book.observe("A", "A", "m", p1)
    a = Answer()
    a.take_body({"choices": [{"text": "A:"}]})
    book.answered("A", "m", p1, a)
    p2 = book.prompt({"prompt": "Q: abcdA: xy"}, chat=False)   # "Q: a" "bcd" ... differ at the padded cell
    assert book.observe("A", "A", "m", p2)[0] == 1
    ids = book.prompt({"prompt": [1, 2, 3]}, chat=False)
    assert ids is not None and ids.tail is None and book.prompt({"prompt": 5}, chat=False) is None


def test_memory_is_bounded_against_huge_prompts_and_many_requests() -> None:
    book = PrefixBook(max_requests=8, max_total_blocks=20_000, max_request_blocks=5_000, max_system_entries=300)
    huge = {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}   # 1 MiB: 262k tokens
    p = Prompt.of(huge, chat=True, max_blocks=4096)
    assert p is not None and len(p.chain) == 4096 and p.est_tokens == 4 + (1 << 18)
    for i in range(100):
        body = {"messages": [{"role": "user", "content": f"{i:08d}" + "y" * (1 << 20)}]}
        q = Prompt.of(body, chat=True, max_blocks=4096)
        assert q is not None
        book.observe(f"r{i}", f"r{i}", "m", q)
        book.answered(f"r{i}", "m", q, _answer("z" * (1 << 20)))
        assert book.total_blocks <= 20_000 and len(book._requests) <= 8
        assert all(len(s) <= 5_000 for per in book._requests.values() for s in per.values())
        assert book.system_entries("m") <= 300
    assert book.dropped_requests > 0
    assert book.total_blocks == sum(len(s) for per in book._requests.values() for s in per.values())
    book.end_request("r99")
    assert "r99" not in book._requests
    assert book.total_blocks == sum(len(s) for per in book._requests.values() for s in per.values())


def test_a_streamed_answer_with_parallel_tool_calls() -> None:
    a = Answer()
    chunks = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                                "function": {"name": "search", "arguments": ""}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":"}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                                "function": {"name": "fetch", "arguments": "{}"}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]},
        {"choices": [], "usage": {"prompt_tokens": 3}},
    ]
    events = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    a.feed_sse(events[:50])   # whole events only are fed by the gateway; a partial one is skipped, not an error
    a.reset()
    a.feed_sse(events)
    assert a.tool_calls() == [("call_a", "search"), ("call_b", "fetch")]
    assert a.calls[0]["arguments"] == "{\"q\":1}"


def test_tool_spans_pair_tool_call_ids_with_results() -> None:
    tb = ToolBook()
    tb.asked("R", [("t1", "search"), ("t2", "fetch")], 10.0)   # parallel tool calls
    msgs = [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "t2", "content": "b"},
            {"role": "tool", "tool_call_id": "t1", "content": "a"}]
    spans = tb.answered("R", msgs, 12.5)
    assert sorted((s.name, s.t_start, s.t_end, s.span, s.request, s.status) for s in spans) == [
        ("fetch", 10.0, 12.5, "tool", "R", "ok"), ("search", 10.0, 12.5, "tool", "R", "ok")]
    assert tb.answered("R", msgs, 20.0) == [] and tb.pending == 0   # the history re-sends them: counted once


def test_a_tool_result_that_never_comes_leaves_no_span_and_is_dropped_at_request_end() -> None:
    tb = ToolBook()
    tb.asked("R", [("t1", "search")], 1.0)
    assert tb.answered("R", [{"role": "user", "content": "never mind"}], 2.0) == []
    assert tb.answered("other", [{"role": "tool", "tool_call_id": "t1"}], 2.0) == []   # another request's id
    tb.end_request("R")
    assert tb.pending == 0 and tb.answered("R", [{"role": "tool", "tool_call_id": "t1"}], 3.0) == []


def test_explicit_tool_spans_turn_inference_off_for_their_request() -> None:
    tb = ToolBook()
    tb.asked("R", [("t1", "search")], 1.0)
    tb.explicit("R")
    tb.asked("R", [("t2", "search")], 2.0)
    assert tb.answered("R", [{"role": "tool", "tool_call_id": "t1"}, {"role": "tool", "tool_call_id": "t2"}], 3.0) == []


def test_pending_tool_calls_are_bounded_in_number_and_age() -> None:
    now = [0.0]
    tb = ToolBook(max_pending=100, max_age_s=60.0, clock=lambda: now[0])
    for i in range(1000):
        tb.asked(f"r{i}", [(f"t{i}", "f")], float(i))
        assert tb.pending <= 100
    assert tb.dropped == 900
    now[0] = 1000.0
    tb.asked("late", [("x", "f")], 1.0)
    assert tb.pending == 1
