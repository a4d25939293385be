"""A workflow's `llms` engine settings reach serve.json: the sim engine's tool-call rate (sim only) and
prefix caching off (each engine's own flag); a plan of several workflows takes the first one's."""

from __future__ import annotations

import json

import pytest

from scepsy_hpc.backend.serving import serve_config
from scepsy_hpc.engine.adapters import engine_argv
from scepsy_hpc.spec.catalog import load_gpus, load_models
from scepsy_hpc.spec.placement_entry import PlacementEntry
from scepsy_hpc.spec.plan import parse_plan
from scepsy_hpc.spec.source import parse_yaml
from scepsy_hpc.spec.workflow import workflow_from_text

WF = """\
name: {name}
llms:
  agent: {{model: llama-3.1-8b-instruct{agent}}}
  helper: {{model: llama-3.2-3b-instruct}}
program:
  - call: agent
    prompt_tokens: 100
    output_tokens: 10
  - call: helper
    prompt_tokens: 100
    output_tokens: 10
"""
PLACEMENT = [PlacementEntry(llm="agent", replica=0, node="n1", gpus=[0]),
             PlacementEntry(llm="helper", replica=0, node="n1", gpus=[1])]


@pytest.fixture(scope="module")
def catalogs():
    return load_models(), load_gpus()


def _setup(catalogs, agent: str, name: str = "t"):
    models, gpus = catalogs
    wf = workflow_from_text(WF.format(name=name, agent=agent), models=models, path="wf.yaml")
    data = {"workflow": name, "gpus": {"type": "h100-sxm", "count": 2}, "allocation": {"agent": {}, "helper": {}}}
    return parse_plan(*parse_yaml(json.dumps(data)), wf, models, gpus), wf


def _argvs(catalogs, plan, wf, engine: str) -> dict[str, list[str]]:
    models, gpus = catalogs
    cfg = serve_config(plan, wf, models, gpus, PLACEMENT, engine=engine)
    return {i.llm: engine_argv(i.launch, python="py") for i in cfg.instances}


def test_the_sim_engine_gets_the_workflows_tool_call_rate_and_vllm_does_not(catalogs) -> None:
    plan, wf = _setup(catalogs, ", tool_call_rate: 0.8")
    sim = _argvs(catalogs, plan, wf, "sim")
    assert sim["agent"][sim["agent"].index("--tool-call-rate") + 1] == "0.8"
    assert "--tool-call-rate" not in sim["helper"]   # unset: the sim engine's own default
    for engine in ("vllm", "sglang"):
        argv = _argvs(catalogs, plan, wf, engine)["agent"]
        assert not any("tool-call-rate" in w for w in argv), (engine, argv)


def test_a_rate_of_zero_is_passed_not_dropped(catalogs) -> None:
    plan, wf = _setup(catalogs, ", tool_call_rate: 0")
    argv = _argvs(catalogs, plan, wf, "sim")["agent"]
    assert argv[argv.index("--tool-call-rate") + 1] == "0.0"


@pytest.mark.parametrize("engine,flag", [("sim", "--no-enable-prefix-caching"), ("vllm", "--no-enable-prefix-caching"),
                                         ("sglang", "--disable-radix-cache")])
def test_prefix_caching_false_gives_each_engine_its_flag(catalogs, engine, flag) -> None:
    plan, wf = _setup(catalogs, ", prefix_caching: false")
    argvs = _argvs(catalogs, plan, wf, engine)
    assert argvs["agent"].count(flag) == 1
    off = {"--no-enable-prefix-caching", "--disable-radix-cache", "--no-prefix-caching"}
    assert not off & set(argvs["helper"])   # on (the default): no flag at all


def test_defaults_leave_the_command_lines_as_they_were(catalogs) -> None:
    plan, wf = _setup(catalogs, "")
    for engine in ("sim", "vllm", "sglang"):
        for argv in _argvs(catalogs, plan, wf, engine).values():
            assert not any("prefix" in w or "radix" in w or "tool-call-rate" in w for w in argv), argv


def test_a_plan_of_several_workflows_takes_the_first_workflows_settings(catalogs) -> None:
    models, gpus = catalogs
    _, first = _setup(catalogs, ", tool_call_rate: 0.25, prefix_caching: false", name="one")
    _, second = _setup(catalogs, ", tool_call_rate: 0.9", name="two")
    data = {"workflows": ["one", "two"], "gpus": {"type": "h100-sxm", "count": 2},
            "allocation": {"agent": {}, "helper": {}},
            "routes": {"one": {"agent": "agent", "helper": "helper"}, "two": {"agent": "agent", "helper": "helper"}}}
    plan = parse_plan(*parse_yaml(json.dumps(data)), None, models, gpus)
    for order, rate, cached in (([first, second], 0.25, False), ([second, first], 0.9, True)):
        launch = {i.llm: i.launch for i in serve_config(plan, order, models, gpus, PLACEMENT,
                                                         engine="sim").instances}["agent"]
        assert (launch.tool_call_rate, launch.prefix_caching) == (rate, cached)


def test_the_settings_survive_serve_json(tmp_path, catalogs) -> None:
    from scepsy_hpc.backend.session import Session

    models, gpus = catalogs
    plan, wf = _setup(catalogs, ", tool_call_rate: 0.8, prefix_caching: false")
    cfg = serve_config(plan, wf, models, gpus, PLACEMENT, engine="sim")
    session = Session(tmp_path / "demo")
    session.write_serve_config(cfg)
    agent = {i.llm: i.launch for i in session.serve_config().instances}["agent"]
    assert (agent.tool_call_rate, agent.prefix_caching) == (0.8, False)
