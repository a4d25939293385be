"""Plan files: allocation validation against workflow, catalogs and GPU budget; GPU counting."""

from __future__ import annotations

import pytest

from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.catalog import config_dir
from scepsy_hpc.spec.plan import LLMAlloc, Plan, gpus_needed, load_plan, parse_plan
from scepsy_hpc.spec.source import parse_yaml
from scepsy_hpc.spec.workflow import load_workflow

PATH = "p.yaml"

# deep_research: planner (llama-3.1-70b), searcher (llama-3.1-8b), writer (qwen2.5-32b).
# Needs 4 + (0.5, 0.5 -> 1 GPU) + 2 = 7 GPUs.
OK = """\
workflow: deep_research
gpus:
  type: h100-sxm
  count: 8
allocation:
  planner: {tp: 4, gpu_frac: 1, replicas: 1}
  searcher: {tp: 1, gpu_frac: 0.5, replicas: 2}
  writer: {tp: 2, replicas: 1}
"""


@pytest.fixture(scope="module")
def wf(models):
    return load_workflow(config_dir() / "workflows" / "deep_research.yaml", models)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def plan_of(text, wf, models, gpus) -> Plan:
    data, smap = parse_yaml(text, PATH)
    return parse_plan(data, smap, wf, models, gpus)


def problems_of(text, wf, models, gpus) -> list[str]:
    with pytest.raises(SpecError) as ei:
        plan_of(text, wf, models, gpus)
    assert str(ei.value) == "\n".join(ei.value.problems)
    return ei.value.problems


def only_problem(text, wf, models, gpus) -> str:
    problems = problems_of(text, wf, models, gpus)
    assert len(problems) == 1, problems
    return problems[0]


# --- valid plans ----------------------------------------------------------------------------------

def test_valid_plan_parses(wf, models, gpus):
    plan = plan_of(OK, wf, models, gpus)
    assert plan.workflow == "deep_research"
    assert (plan.gpus.type, plan.gpus.count) == ("h100-sxm", 8)
    assert plan.allocation["planner"] == LLMAlloc(tp=4)
    assert plan.allocation["searcher"].gpu_frac == 0.5 and plan.allocation["searcher"].replicas == 2
    assert plan.allocation["writer"].tp == 2 and plan.allocation["writer"].gpu_frac == 1.0
    assert gpus_needed(plan.allocation) == 7


def test_valid_plan_exactly_at_budget(wf, models, gpus):
    plan = plan_of(OK.replace("count: 8", "count: 7"), wf, models, gpus)
    assert plan.gpus.count == 7


def test_plan_without_workflow_skips_llm_checks(models, gpus):
    plan = plan_of(OK + "  extra: {tp: 1}\n", None, models, gpus)
    assert "extra" in plan.allocation


def test_load_plan_from_file(tmp_path, wf, models, gpus):
    path = tmp_path / "plan.yaml"
    path.write_text(OK)
    plan = load_plan(path, wf, models, gpus)
    assert set(plan.allocation) == {"planner", "searcher", "writer"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(OK.replace("count: 8", "count: 3"))
    with pytest.raises(SpecError) as ei:
        load_plan(bad, wf, models, gpus)
    assert ei.value.problems[0].startswith(f"{bad}:4: gpus.count: ")


def test_later_sections_kept(wf, models, gpus):
    text = OK + "predicted: {throughput_rps: 1.5}\nnotes: hand-written\n"
    plan = plan_of(text, wf, models, gpus)
    assert plan.predicted == {"throughput_rps": 1.5}
    assert plan.notes == "hand-written"


# --- invalid plans --------------------------------------------------------------------------------

def test_missing_llm_in_allocation(wf, models, gpus):
    text = OK.replace("  writer: {tp: 2, replicas: 1}\n", "")
    p = only_problem(text, wf, models, gpus)
    assert p.startswith(f"{PATH}:{line_of(text, 'allocation:')}: allocation: "), p
    assert "LLM 'writer'" in p and "deep_research" in p
    assert "has no entry" in p
    assert "writer: {tp: 1" in p  # how to fix it


def test_unknown_llm_in_allocation(wf, models, gpus):
    text = OK + "  wirter: {tp: 1}\n"
    p = only_problem(text, wf, models, gpus)
    assert p.startswith(f"{PATH}:{line_of(text, 'wirter:')}: allocation.wirter: "), p
    assert "has no LLM 'wirter'" in p
    assert "did you mean 'writer'?" in p
    assert "known: planner, searcher, writer" in p


def test_unknown_gpu_type_suggests(wf, models, gpus):
    text = OK.replace("h100-sxm", "h100-sxn")
    p = only_problem(text, wf, models, gpus)
    assert p.startswith(f"{PATH}:{line_of(text, 'type: h100-sxn')}: gpus.type: "), p
    assert "unknown GPU type 'h100-sxn'" in p
    assert "did you mean 'h100-sxm'?" in p
    for g in ("a100-40gb", "a100-80gb", "h200", "l40s"):
        assert g in p


def test_fractional_gpu_with_tp2(wf, models, gpus):
    text = OK.replace("writer: {tp: 2, replicas: 1}", "writer: {tp: 2, gpu_frac: 0.5}")
    p = only_problem(text, wf, models, gpus)
    assert p.startswith(f"{PATH}:{line_of(text, 'writer:')}: allocation.writer: "), p
    assert "gpu_frac=0.5 needs tp=1" in p


def test_tp3_rejected(wf, models, gpus):
    text = OK.replace("writer: {tp: 2, replicas: 1}", "writer: {tp: 3}")
    p = only_problem(text, wf, models, gpus)
    assert p.startswith(f"{PATH}:{line_of(text, 'writer:')}: allocation.writer: "), p
    assert "tp=3 is not one of 1, 2, 4, 8, 16" in p


def test_too_many_gpus_gives_both_numbers(wf, models, gpus):
    text = OK.replace("count: 8", "count: 6")
    p = only_problem(text, wf, models, gpus)
    assert p.startswith(f"{PATH}:{line_of(text, 'count: 6')}: gpus.count: "), p
    assert "needs 7 GPUs" in p
    assert "has 6" in p


def test_70b_at_tp1_on_a100_40gb_does_not_fit(wf, models, gpus):
    text = OK.replace("h100-sxm", "a100-40gb").replace("planner: {tp: 4, gpu_frac: 1, replicas: 1}", "planner: {tp: 1}")
    p = only_problem(text, wf, models, gpus)
    assert p.startswith(f"{PATH}:{line_of(text, 'planner:')}: allocation.planner: "), p
    assert "Llama-3.1-70B" in p and "a100-40gb" in p
    assert "GiB" in p
    assert "raise tp" in p
    # 70.6e9 params * 2 bytes = 131.5 GiB of weights
    assert "131.5 GiB weights" in p


def test_fractional_share_too_small_for_model(wf, models, gpus):
    text = OK.replace("searcher: {tp: 1, gpu_frac: 0.5, replicas: 2}", "searcher: {tp: 1, gpu_frac: 0.1, replicas: 2}")
    p = only_problem(text, wf, models, gpus)
    assert p.startswith(f"{PATH}:{line_of(text, 'searcher:')}: allocation.searcher: "), p
    assert "gpu_frac=0.1" in p and "GiB" in p


def test_several_plan_problems_reported(wf, models, gpus):
    text = OK.replace("count: 8", "count: 2").replace("  writer: {tp: 2, replicas: 1}\n", "  wirter: {tp: 2}\n")
    problems = problems_of(text, wf, models, gpus)
    assert len(problems) == 3, problems
    joined = "\n".join(problems)
    assert "LLM 'writer'" in joined and "has no entry" in joined
    assert "allocation.wirter" in joined
    assert f"{PATH}:4: gpus.count: the allocation needs 7 GPUs but the plan has 2" in joined


@pytest.mark.parametrize("bad,needle", [
    ("gpu_frac: 0", "greater than 0"),
    ("gpu_frac: 1.5", "less than or equal to 1"),
    ("replicas: 0", "greater than or equal to 1"),
])
def test_alloc_field_ranges(wf, models, gpus, bad, needle):
    text = OK.replace("writer: {tp: 2, replicas: 1}", "writer: {tp: 1, " + bad + "}")
    p = only_problem(text, wf, models, gpus)
    assert p.startswith(f"{PATH}:{line_of(text, 'writer:')}: allocation.writer."), p
    assert needle in p


def test_plan_must_be_mapping(wf, models, gpus):
    p = only_problem("- a\n", wf, models, gpus)
    assert p.startswith(f"{PATH}:1: ") and "mapping" in p


def test_plan_unknown_top_level_key(wf, models, gpus):
    text = OK + "colour: red\n"
    p = only_problem(text, wf, models, gpus)
    assert p.startswith(f"{PATH}:{line_of(text, 'colour:')}: colour: unknown key 'colour'"), p
    assert "allocation" in p and "gpus" in p


# --- GPU counting ---------------------------------------------------------------------------------

def test_llm_alloc_gpus_property():
    assert LLMAlloc(tp=4, replicas=2).gpus == 8
    assert LLMAlloc(gpu_frac=0.25, replicas=3).gpus == pytest.approx(0.75)
    assert LLMAlloc().gpus == 1


def test_gpus_needed_whole_only():
    assert gpus_needed({"a": LLMAlloc(tp=2, replicas=3), "b": LLMAlloc(tp=8)}) == 14


def test_gpus_needed_fractional_only():
    assert gpus_needed({"a": LLMAlloc(gpu_frac=0.5, replicas=3)}) == 2
    assert gpus_needed({"a": LLMAlloc(gpu_frac=0.3, replicas=3)}) == 1


def test_gpus_needed_mixes_whole_and_fractional():
    alloc = {
        "big": LLMAlloc(tp=2, replicas=2),              # 4 whole GPUs
        "small": LLMAlloc(gpu_frac=0.5, replicas=3),    # 0.5 0.5 | 0.5
        "tiny": LLMAlloc(gpu_frac=0.3),                 # fits beside the lone 0.5
        "one": LLMAlloc(tp=1, gpu_frac=1.0),            # 1 whole GPU
    }
    assert gpus_needed(alloc) == 4 + 1 + 2
    # fractions of different LLMs share GPUs: 0.6 + 0.4 on one GPU
    assert gpus_needed({"a": LLMAlloc(gpu_frac=0.6), "b": LLMAlloc(gpu_frac=0.4), "c": LLMAlloc(tp=4)}) == 5


def test_plan_schema_version_defaults_and_is_checked(wf, models, gpus):
    assert plan_of(OK, wf, models, gpus).schema_version == 1
    assert plan_of("schema_version: 1\n" + OK, wf, models, gpus).schema_version == 1
    msg = only_problem("schema_version: 3\n" + OK, wf, models, gpus)
    assert msg.startswith(f"{PATH}:1: schema_version: 3 is not the plan format this scepsy reads (1)")
    assert "re-plan with `scepsy plan`" in msg
