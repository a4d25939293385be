"""spec.limits: refusals name the limit and its variable, and the variable raises it."""

from __future__ import annotations

import pytest

from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.catalog import load_gpus, load_models
from scepsy_hpc.spec.cluster import load_cluster
from scepsy_hpc.spec.placement_check import check_placement
from scepsy_hpc.spec.source import parse_yaml
from scepsy_hpc.spec.workflow import workflow_from_text

LOOP = ("name: x\nllms:\n  a: {model: llama-3.1-8b-instruct}\nprogram:\n"
        "  - loop: {repeat: 20000, body: [{call: a, prompt_tokens: 10, output_tokens: 10}]}\n")


def test_a_limit_is_named_and_its_variable_raises_it(monkeypatch) -> None:
    models = load_models()
    with pytest.raises(SpecError) as exc:
        workflow_from_text(LOOP, models, "w.yaml")
    assert "w.yaml:5:" in str(exc.value) and "SCEPSY_MAX_LOOP_REPEAT" in str(exc.value)
    monkeypatch.setenv("SCEPSY_MAX_LOOP_REPEAT", "30000")
    assert workflow_from_text(LOOP, models, "w.yaml").name == "x"


def test_a_bad_limit_variable_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("SCEPSY_MAX_YAML_DEPTH", "lots")
    with pytest.raises(SpecError) as exc:
        parse_yaml("a: 1\n")
    assert "SCEPSY_MAX_YAML_DEPTH" in str(exc.value)


def test_the_expected_calls_follow_recursion_to_max_depth(monkeypatch) -> None:
    text = ("name: x\nllms:\n  a: {model: llama-3.1-8b-instruct}\nmax_depth: 20\ndefine:\n"
            "  r: [{call: a, prompt_tokens: 1, output_tokens: 1}, {use: r}, {use: r}]\nprogram:\n  - use: r\n")
    with pytest.raises(SpecError) as exc:
        workflow_from_text(text, load_models(), "w.yaml")
    assert "w.yaml:4:" in str(exc.value) and "1,048,575 LLM calls" in str(exc.value)
    monkeypatch.setenv("SCEPSY_MAX_CALLS_PER_REQUEST", "3000000")
    workflow_from_text(text, load_models(), "w.yaml")


def test_check_placement_against_the_cluster() -> None:
    from scepsy_hpc.spec.plan import parse_plan

    gpus = load_gpus()
    cluster = load_cluster("configs/clusters/local.yaml", gpus)
    text = ("gpus: {type: h100-sxm, count: 16}\nallocation:\n  a: {tp: 2, replicas: 2}\nplacement:\n"
            "  - {llm: a, replica: 0, node: node1, gpus: [0, 1], port: 8100}\n"
            "  - {llm: a, replica: 1, node: node1, gpus: [2, 3], port: 8100}\n")
    data, smap = parse_yaml(text, "p.yaml")
    with pytest.raises(SpecError) as exc:  # what a plan says about itself: checked with it, cluster or not
        parse_plan(data, smap, None, load_models(), gpus)
    assert exc.value.problems == [
        "p.yaml:6: placement[1].port: port 8100 on node 'node1' is already placement[0]'s; give each engine on a node its own port"]
    data, smap = parse_yaml(text.replace("node: node1, gpus: [2, 3], port: 8100", "node: node99, gpus: [2, 3], port: 8101"), "p.yaml")
    problems = check_placement(parse_plan(data, smap, None, load_models(), gpus), cluster, smap)
    assert len(problems) == 1 and problems[0].startswith("p.yaml:6: placement[1].node: 'node99' is not a node of the cluster")
