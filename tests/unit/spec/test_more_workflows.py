"""The agent-framework workflows added for issue 23 validate, sample the shape their descriptions
promise (mean calls per LLM per request, prompts within each model's context) and run in the simulator.

The expected call counts are worked out by hand from each file's structure (loops, branch
probabilities, fan-out widths), so a changed file or a sampler that miscounts a shape fails here.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from scepsy_hpc.sim import simulate
from scepsy_hpc.spec.catalog import load_gpus, load_models
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import load_workflow, resolve_model
from scepsy_hpc.workload.sampler import iter_calls, sample_request

WORKFLOW_DIR = Path(__file__).resolve().parents[3] / "configs" / "workflows"

# workflow -> mean LLM calls per request, per LLM (from the structure of the file)
EXPECTED_CALLS = {
    "tot_verifier": {"generator": 16 * 5.5, "verifier": 16 * 5.5},
    "plan_execute": {"planner": 6.15, "executor": 12.9},
    "reflexion": {"actor": 2.2, "reflector": 1.2},
    "supervisor_agents": {"supervisor": 6.5, "researcher": 3.0375, "coder": 1.575, "mathstral": 0.9},
    "map_reduce_summary": {"mapper": 26.0, "reducer": 2.65},
    "long_context_refine": {"reader": 8.5, "answerer": 1.0},
    "self_rag": {"grader": 8.625, "generator": 1.3125, "rewriter": 0.35},
    "group_chat_selector": {"selector": 7.0, "planner": 2.4, "critic": 2.1, "writer": 2.1, "checker": 1.4},
    "agents_handoffs": {"triage": 1.0, "billing": 1.22, "support": 0.6, "refunds": 0.52},
    "llm_compiler": {"planner": 3.5, "extractor": 2.25},
    "multi_agent_debate": {"debater": 9.0, "judge": 1.0},
    "router_cascade": {"router": 1.6, "small": 0.6, "large": 0.55},
    "crew_hierarchical": {"manager": 4.6, "researcher": 5.2, "analyst": 4.25},
}
NAMES = sorted(EXPECTED_CALLS)


@pytest.fixture(scope="module")
def models():
    return load_models()


@pytest.fixture(scope="module")
def h100():
    return load_gpus()["h100-sxm"]


def _load(name, models):
    return load_workflow(WORKFLOW_DIR / f"{name}.yaml", models)


def test_at_least_ten_new_workflows_each_naming_its_source(models):
    assert len(NAMES) >= 10
    for name in NAMES:
        wf = _load(name, models)
        assert wf.name == name
        # the description names the framework or paper the shape comes from
        assert any(k in wf.description for k in ("LangGraph", "AutoGen", "CrewAI", "Agents SDK", "arXiv", "LangChain"))


@pytest.mark.parametrize("name", NAMES)
def test_samples_have_the_described_shape(name, models):
    wf = _load(name, models)
    rng = random.Random(7)
    n = 400
    counts: Counter[str] = Counter()
    for _ in range(n):
        for call in iter_calls(sample_request(wf, rng)):
            counts[call.llm] += 1
            limit = resolve_model(wf, call.llm, models).max_model_len
            assert call.prompt_tokens + call.output_tokens <= limit, (name, call)
    for llm, mean in EXPECTED_CALLS[name].items():
        assert counts[llm] / n == pytest.approx(mean, rel=0.15), (name, llm, counts[llm] / n)
    assert set(counts) == set(wf.llms)


def test_tot_verifier_fans_out_in_lock_step(models):
    """Each depth is two 16-wide groups: generators, then verifiers (the barrier the issue's loss comes from)."""
    wf = _load("tot_verifier", models)
    seq = sample_request(wf, random.Random(1))
    groups = [item for item in seq if isinstance(item, list)]
    assert 8 <= len(groups) <= 14 and len(groups) == len(seq)
    for i, g in enumerate(groups):
        assert len(g) == 16
        assert {c.llm for lane in g for c in lane} == {"generator" if i % 2 == 0 else "verifier"}


def _alloc(wf, models):
    """One replica per LLM, tp large enough for the weights and some KV cache on an H100."""
    out = {}
    for llm in wf.llms:
        m = resolve_model(wf, llm, models)
        tp = 1
        while m.params_b * m.dtype_bytes > 0.6 * 80 * tp:
            tp *= 2
        out[llm] = LLMAlloc(tp=tp, gpu_frac=1.0, replicas=1)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_simulates_every_request(name, models, h100):
    wf = _load(name, models)
    res = simulate(wf, _alloc(wf, models), h100, models, rate_rps=0.05, n_requests=12, seed=3)
    assert res.completed == res.requests == 12
    assert res.latency_mean_s > 0
    assert set(res.per_llm) == set(wf.llms) and all(s.calls > 0 for s in res.per_llm.values())
