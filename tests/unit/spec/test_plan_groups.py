"""Mixed groups in plan files: a list of configurations per LLM, its checks, and its round trip."""

from __future__ import annotations

import pytest
import yaml

from scepsy_hpc.errors import SpecError
from scepsy_hpc.planning.render import write_plan
from scepsy_hpc.spec.catalog import config_dir
from scepsy_hpc.spec.plan import (LLMAlloc, MAX_GROUPS, gpus_needed, groups_of, iter_instances, load_plan, parse_plan,
                                  replica_groups, replicas_of)
from scepsy_hpc.spec.source import parse_yaml
from scepsy_hpc.spec.workflow import load_workflow

# deep_research: planner (llama-3.1-70b), searcher (llama-3.1-8b), writer (qwen2.5-32b).
MIXED = """\
workflow: deep_research
gpus: {type: h100-sxm, count: 16}
allocation:
  planner: {tp: 4}
  searcher:
    - {tp: 2, replicas: 2, capacity_rps: 30}
    - {tp: 1, gpu_frac: 0.5, replicas: 3, capacity_rps: 9.5}
  writer: [{tp: 2}]
"""


@pytest.fixture(scope="module")
def wf(models):
    return load_workflow(config_dir() / "workflows" / "deep_research.yaml", models)


def plan_of(text, wf, models, gpus):
    data, smap = parse_yaml(text, "p.yaml")
    return parse_plan(data, smap, wf, models, gpus)


def problems_of(text, wf, models, gpus) -> list[str]:
    with pytest.raises(SpecError) as ei:
        plan_of(text, wf, models, gpus)
    return ei.value.problems


def test_a_mixed_group_parses_with_its_replicas_numbered_group_by_group(wf, models, gpus):
    plan = plan_of(MIXED, wf, models, gpus)
    searcher = plan.allocation["searcher"]
    assert [(g.tp, g.gpu_frac, g.replicas) for g in groups_of(searcher)] == [(2, 1.0, 2), (1, 0.5, 3)]
    assert replicas_of(searcher) == 5
    assert [g.tp for g in replica_groups(searcher)] == [2, 2, 1, 1, 1]
    assert plan.groups()["planner"] == [LLMAlloc(tp=4)] and len(plan.groups()["writer"]) == 1
    # 4 (planner) + 4 (searcher tp 2) + 2 shared GPUs (three halves) + 2 (writer)
    assert gpus_needed(plan.allocation) == 12
    assert [(m, r) for m, r, _ in iter_instances(plan.allocation)][:7] == [
        ("planner", 0), ("searcher", 0), ("searcher", 1), ("searcher", 2), ("searcher", 3), ("searcher", 4), ("writer", 0)]


def test_a_mixed_plan_round_trips_through_its_file(tmp_path, wf, models, gpus):
    plan = plan_of(MIXED, wf, models, gpus)
    path = tmp_path / "plan.yaml"
    write_plan(plan, path)
    data = yaml.safe_load(path.read_text())
    assert isinstance(data["allocation"]["searcher"], list) and isinstance(data["allocation"]["planner"], dict)
    again = load_plan(path, wf, models, gpus)
    assert again.allocation == plan.allocation


@pytest.mark.parametrize("entry, needle, line", [
    ("[{tp: 2}, {tp: 2, replicas: 3}]", "the same configuration (tp=2) as allocation.searcher[0]; merge them into "
                                        "one entry with replicas: 4", 6),
    ("[{tp: 1, tool_call_parser: hermes}, {tp: 2}]", "different tool_call_parsers", 6),
    ("[]", "at least 1 item", 6),
    ("[" + ", ".join(f"{{tp: 1, max_num_seqs: {k + 1}}}" for k in range(MAX_GROUPS + 1)) + "]", "at most 8 items", 6),
    ("[{tp: 1}, {tp: 3}]", "tp=3 is not one of", 6),
    ("[{tp: 1}, 7]", "allocation.searcher[1]", 6),
])
def test_a_bad_mixed_group_is_refused_with_its_place_and_the_fix(wf, models, gpus, entry, needle, line):
    text = f"""\
workflow: deep_research
gpus: {{type: h100-sxm, count: 16}}
allocation:
  planner: {{tp: 4}}
  writer: {{tp: 2}}
  searcher: {entry}
"""
    problems = problems_of(text, wf, models, gpus)
    assert any(needle in p for p in problems), problems
    assert all(p.startswith(f"p.yaml:{line}") for p in problems if needle in p), problems


def test_a_group_of_too_small_a_share_names_that_configuration(wf, models, gpus):
    text = MIXED.replace("writer: [{tp: 2}]", "writer: [{tp: 2}, {tp: 1, gpu_frac: 0.25}]")
    (p,) = problems_of(text, wf, models, gpus)
    assert p.startswith("p.yaml:") and "allocation.writer[1]:" in p and "raise tp or gpu_frac" in p


def test_a_placement_of_a_mixed_group_gives_each_replica_its_own_configuration(wf, models, gpus):
    placed = MIXED + """\
placement:
  - {llm: planner, replica: 0, node: n1, gpus: [0, 1, 2, 3]}
  - {llm: searcher, replica: 0, node: n1, gpus: [4, 5]}
  - {llm: searcher, replica: 1, node: n1, gpus: [6, 7]}
  - {llm: searcher, replica: 2, node: n2, gpus: [0], gpu_frac: 0.5}
  - {llm: searcher, replica: 3, node: n2, gpus: [0], gpu_frac: 0.5}
  - {llm: searcher, replica: 4, node: n2, gpus: [1], gpu_frac: 0.5}
  - {llm: writer, replica: 0, node: n2, gpus: [2, 3]}
"""
    plan = plan_of(placed, wf, models, gpus)
    assert len(plan.placement) == 7
    wrong = placed.replace("{llm: searcher, replica: 2, node: n2, gpus: [0], gpu_frac: 0.5}",
                           "{llm: searcher, replica: 2, node: n2, gpus: [0, 1]}")
    problems = problems_of(wrong, wf, models, gpus)
    assert any("must list 1 GPU index(es) for tp=1 (replica 2 of 'searcher' is a gpu_frac=0.5 instance of its mixed group)" in p for p in problems), problems
    short = placed.replace("  - {llm: searcher, replica: 4, node: n2, gpus: [1], gpu_frac: 0.5}\n", "")
    assert any("searcher·4 are not placed" in p for p in problems_of(short, wf, models, gpus))
