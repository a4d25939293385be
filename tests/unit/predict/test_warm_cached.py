"""What a warm prefix cache reuses of each sampled call equals what a cache of the calls' blocks would hold
(a block-by-block reference), on conversations that grow, branch into lanes, and switch LLMs."""

from __future__ import annotations

import random

from scepsy_hpc.perf.prefix import BLOCK_TOKENS, max_hit_tokens, segment_blocks
from scepsy_hpc.predict.inputs import sample_mix, warm_cached_tokens
from scepsy_hpc.spec.catalog import load_models, resolve_input
from scepsy_hpc.spec.workflow import load_workflow, workflow_from_text
from scepsy_hpc.workload.sampler import RequestSampler, iter_calls

BRANCHY = """
name: beams
llms: {m: {model: llama-3.1-8b-instruct}, k: {model: llama-3.1-8b-instruct}}
program:
  - {call: m, context: c, shared_prefix_tokens: 40, prompt_tokens: {uniform_int: {low: 50, high: 90}}, output_tokens: 17}
  - fanout: {count: 3, body: [{call: m, context: c, prompt_tokens: 5, output_tokens: 7},
                              {call: k, context: c, prompt_tokens: 9, output_tokens: 30},
                              {call: m, context: c, prompt_tokens: 25, output_tokens: 3}]}
  - {call: m, context: c, prompt_tokens: 3, output_tokens: 1}
  - {call: k, context: c, prompt_tokens: 33, output_tokens: 1}
"""


def _by_blocks(seq: list) -> list[int]:
    seen: dict[str, set] = {}
    out = []
    for c in iter_calls(seq):
        if not c.segments:
            out.append(0)
            continue
        have, n = seen.setdefault(c.llm, set()), 0
        for b in segment_blocks(c.segments)[:max_hit_tokens(c.prompt_tokens) // BLOCK_TOKENS]:
            if b not in have and not (isinstance(b, tuple) and isinstance(b[0], tuple) and b[0][:1] == ("shared",)):
                break
            n += 1
        out.append(n * BLOCK_TOKENS)
        have.update(segment_blocks(c.segments + ((c.output_segment, c.output_tokens),)))
    return out


def test_the_warm_share_is_what_a_cache_of_the_calls_blocks_holds():
    models = load_models()
    rng = random.Random(1)
    for wf in (load_workflow(resolve_input("react_agent", "workflows"), models), workflow_from_text(BRANCHY, models)):
        sampler = RequestSampler(wf)
        for _ in range(200):
            seq = sampler.sample(rng)
            assert warm_cached_tokens(seq) == _by_blocks(seq)


def test_react_steps_reuse_their_history_and_the_mix_says_so():
    wf = load_workflow(resolve_input("react_agent", "workflows"), load_models())
    seq = RequestSampler(wf).sample(random.Random(0))
    calls = list(iter_calls(seq))
    warm = warm_cached_tokens(seq)
    assert warm[0] == 1488                       # the 1,500-token system prompt: 93 whole blocks
    for prev, cur, w in zip(calls[:7], calls[1:8], warm[1:8]):
        assert w == (prev.prompt_tokens + prev.output_tokens) // 16 * 16   # the previous step, whole blocks
    assert warm[8] == 0                          # the summarizer shares nothing
    mix = sample_mix([seq])
    assert mix["agent"][1] == (calls[1].prompt_tokens, calls[1].output_tokens, warm[1])
    assert mix["summarizer"] == [(calls[8].prompt_tokens, calls[8].output_tokens)]
