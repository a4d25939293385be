"""Request sampling: programs become call trees; recursion is bounded; arrivals are seeded."""

from __future__ import annotations

import random

from scepsy_hpc.spec.catalog import config_dir
from scepsy_hpc.spec.workflow import load_workflow, workflow_from_text
from scepsy_hpc.workload.arrivals import poisson_arrivals
from scepsy_hpc.workload.sampler import iter_calls, sample_request


def _wf(name, models):
    return load_workflow(config_dir() / "workflows" / f"{name}.yaml", models)


def test_recursion_is_bounded_by_max_depth(models):
    text = """name: rec
llms: {m: {model: llama-3.1-8b-instruct}}
max_depth: 3
define:
  again:
    - {call: m, prompt_tokens: 1, output_tokens: 1}
    - use: again
program:
  - use: again
"""
    wf = workflow_from_text(text, models)
    tree = sample_request(wf, random.Random(0))
    assert len(list(iter_calls(tree))) == 3


def test_sampled_call_counts_vary_per_request_for_beam_search(models):
    wf = _wf("beam_search", models)
    rng = random.Random(1)
    counts = [sum(1 for c in iter_calls(sample_request(wf, rng)) if c.llm == "generator") for _ in range(300)]
    assert min(counts) < 60 and max(counts) > 300  # tens to hundreds of generator calls


def test_poisson_arrivals_are_increasing_and_seeded():
    a = poisson_arrivals(4.0, 500, random.Random("0/arrivals"))
    assert a == poisson_arrivals(4.0, 500, random.Random("0/arrivals"))
    assert all(x < y for x, y in zip(a, a[1:])) and a[0] > 0
    assert 100 < a[-1] < 150  # 500 arrivals at 4/s take about 125 s
