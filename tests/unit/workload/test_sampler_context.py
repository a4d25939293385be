"""Conversations in the sampler: a `context` call's prompt is the conversation so far plus its new tokens."""

from __future__ import annotations

import random

import pytest

from scepsy_hpc.errors import SpecError
from scepsy_hpc.perf.prefix import segment_blocks
from scepsy_hpc.spec.workflow import workflow_from_text
from scepsy_hpc.workload.sampler import Call, iter_calls, sample_request

REACT = """
name: react
llms: {agent: {model: llama-3.1-8b-instruct}}
tools: {search: {latency_s: 0.5}}
program:
  - {call: agent, context: c, shared_prefix_tokens: 300, prompt_tokens: 400, output_tokens: 50}
  - loop:
      repeat: 3
      body:
        - {tool: search}
        - {call: agent, context: c, prompt_tokens: 120, output_tokens: 50}
"""


def test_prompts_grow_by_the_answer_and_the_new_tokens():
    calls = list(iter_calls(sample_request(workflow_from_text(REACT), random.Random(1))))
    assert [c.prompt_tokens for c in calls] == [400, 400 + 50 + 120, 570 + 50 + 120, 740 + 50 + 120]
    # call k's prompt is call k−1's prompt, its answer, then the new tokens: the blocks of k−1's prompt and
    # answer begin k's blocks
    for prev, cur in zip(calls, calls[1:]):
        before = segment_blocks(prev.segments + ((prev.output_segment, prev.output_tokens),))
        assert segment_blocks(cur.segments)[:len(before)] == before
    assert calls[0].segments[0] == (("shared", "agent", None, 300), 300)
    assert max(len(c.segments) for c in calls) == 2   # the shared prompt, one piece of the conversation


def test_two_requests_share_only_the_system_prompt():
    wf = workflow_from_text(REACT)
    a = next(iter_calls(sample_request(wf, random.Random(1))))
    b = next(iter_calls(sample_request(wf, random.Random(2))))
    ba, bb = segment_blocks(a.segments), segment_blocks(b.segments)
    common = 0
    while ba[common] == bb[common]:
        common += 1
    assert common == 300 // 16                     # 18 whole blocks of the 300 shared tokens


def test_lanes_branch_off_and_the_conversation_resumes_before_the_group():
    wf = workflow_from_text("""
name: beams
llms: {m: {model: llama-3.1-8b-instruct}}
program:
  - {call: m, context: c, prompt_tokens: 100, output_tokens: 10}
  - fanout: {count: 2, body: [{call: m, context: c, prompt_tokens: 5, output_tokens: 7}]}
  - {call: m, context: c, prompt_tokens: 3, output_tokens: 1}
""")
    calls = list(iter_calls(sample_request(wf, random.Random(0))))
    assert [c.prompt_tokens for c in calls] == [100, 115, 115, 113]
    first, lane1, lane2, last = calls
    b1, b2, b3 = (segment_blocks(c.segments) for c in (lane1, lane2, last))
    # 110 tokens of history (6 whole blocks) shared; the block ending at 112 differs in each: the lanes
    # appended different tokens, and the conversation resumed from before the group
    assert b1[:6] == b2[:6] == b3[:6] and len({b1[6], b2[6], b3[6]}) == 3


def test_without_context_nothing_is_shared_and_samples_compare_as_before():
    wf = workflow_from_text("""
name: plain
llms: {m: {model: llama-3.1-8b-instruct}}
program: [{call: m, prompt_tokens: 100, output_tokens: 10}]
""")
    assert sample_request(wf, random.Random(3)) == [Call("m", None, 100, 10)]
    assert sample_request(wf, random.Random(3))[0].segments == ()


def test_a_shared_prefix_as_long_as_the_prompt_is_refused_with_its_line():
    with pytest.raises(SpecError, match=r"<string>:5: .*shared_prefix_tokens: 100 shared tokens.*as short as 100"):
        workflow_from_text("""
name: bad
llms: {m: {model: llama-3.1-8b-instruct}}
program:
  - {call: m, shared_prefix_tokens: 100, prompt_tokens: 100, output_tokens: 10}
""")


def test_a_very_long_conversation_costs_memory_by_its_branches_not_its_steps():
    wf = workflow_from_text("""
name: long
llms: {m: {model: llama-3.1-8b-instruct}}
program:
  - loop: {repeat: 5000, body: [{call: m, context: c, prompt_tokens: 100, output_tokens: 10}]}
""")
    calls = list(iter_calls(sample_request(wf, random.Random(0))))
    assert calls[-1].prompt_tokens == 4999 * 110 + 100
    assert max(len(c.segments) for c in calls) == 1   # one piece, extended: not 10,000 pieces per call
