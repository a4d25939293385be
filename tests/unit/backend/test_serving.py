"""A deployment's session files: serve.json from a placement (defaults from the one place), the plan copied
owner-only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scepsy_hpc.backend.serving import HEALTH_TIMEOUT_S, serve_config, write_serve_files
from scepsy_hpc.backend.session import Session
from scepsy_hpc.spec.catalog import config_dir, load_gpus, load_models
from scepsy_hpc.spec.placement_entry import PlacementEntry
from scepsy_hpc.spec.plan import parse_plan
from scepsy_hpc.spec.source import parse_yaml
from scepsy_hpc.spec.workflow import load_workflow


@pytest.fixture(scope="module")
def inputs():
    models, gpus = load_models(), load_gpus()
    wf = load_workflow(config_dir() / "workflows" / "rag_rerank.yaml", models)
    data = {"workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 5},
            "allocation": {"generator": {"tp": 4}, "rewriter": {"gpu_frac": 0.5}, "reranker": {"gpu_frac": 0.5}}}
    plan = parse_plan(*parse_yaml(json.dumps(data)), wf, models, gpus)
    return plan, wf, models, gpus


def test_a_hand_written_placement_gets_the_default_memory_fraction_mps_share_and_port(inputs) -> None:
    plan, wf, models, gpus = inputs
    placement = [PlacementEntry(llm="generator", replica=0, node="n1", gpus=[0, 1, 2, 3]),
                 PlacementEntry(llm="rewriter", replica=0, node="n2", gpus=[0]),
                 PlacementEntry(llm="reranker", replica=0, node="n2", gpus=[0], mem_frac=0.4, port=9000)]
    cfg = serve_config(plan, wf, models, gpus, placement, engine="sim", time_scale=0.5)
    gen, rew, rer = cfg.instances
    assert (gen.launch.mem_frac, gen.mps_pct, gen.port, gen.launch.tp) == (pytest.approx(0.9), 100, 8100, 4)
    assert (rew.launch.mem_frac, rew.mps_pct, rew.port) == (pytest.approx(0.45), 50, 8100)
    assert (rer.launch.mem_frac, rer.mps_pct, rer.port) == (0.4, 50, 9000)
    assert cfg.health_timeout_s == HEALTH_TIMEOUT_S["sim"] and rew.launch.time_scale == 0.5


def test_write_serve_files_copies_the_plan_owner_only(tmp_path: Path, inputs) -> None:
    plan, wf, models, gpus = inputs
    session = Session(tmp_path / "demo")
    cfg = serve_config(plan, wf, models, gpus, [PlacementEntry(llm="generator", replica=0, node="n1", gpus=[0, 1, 2, 3])],
                       engine="sim")
    src = tmp_path / "plan.yaml"
    src.write_text("gpus: {type: h100-sxm, count: 4}\n")
    write_serve_files(session, cfg, src)
    assert session.serve_config() == cfg
    assert (session.dir / "plan.yaml").read_text() == src.read_text()
    assert (session.dir / "plan.yaml").stat().st_mode & 0o077 == 0


def test_served_engines_get_their_models_tool_call_parsers_from_the_catalog(inputs) -> None:
    from scepsy_hpc.engine.adapters import engine_argv

    plan, wf, models, gpus = inputs
    placement = [PlacementEntry(llm="generator", replica=0, node="n1", gpus=[0, 1, 2, 3]),
                 PlacementEntry(llm="rewriter", replica=0, node="n2", gpus=[0]),
                 PlacementEntry(llm="reranker", replica=0, node="n2", gpus=[0])]
    by_llm = {i.llm: engine_argv(i.launch) for i in serve_config(plan, wf, models, gpus, placement,
                                                                   engine="vllm").instances}
    # Llama 3.x: llama3_json; Qwen2.5: hermes (configs/models.yaml); without them vLLM refuses every call with tools
    assert by_llm["generator"][-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    assert by_llm["reranker"][by_llm["reranker"].index("--tool-call-parser") + 1] == "hermes"
    sim = serve_config(plan, wf, models, gpus, placement, engine="sim").instances
    assert not any("--tool-call-parser" in engine_argv(i.launch) for i in sim)


def test_the_plan_and_then_the_cli_override_the_catalogs_parsers(inputs) -> None:
    from scepsy_hpc.engine.adapters import engine_argv
    from scepsy_hpc.errors import SpecError

    _, wf, models, gpus = inputs
    data = {"workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 5},
            "allocation": {"generator": {"tp": 4, "tool_call_parser": "pythonic"},
                           "rewriter": {"gpu_frac": 0.5, "tool_call_parser": "none"}, "reranker": {"gpu_frac": 0.5}}}
    plan = parse_plan(*parse_yaml(json.dumps(data)), wf, models, gpus)
    placement = [PlacementEntry(llm="generator", replica=0, node="n1", gpus=[0, 1, 2, 3]),
                 PlacementEntry(llm="rewriter", replica=0, node="n2", gpus=[0]),
                 PlacementEntry(llm="reranker", replica=0, node="n2", gpus=[0])]

    def parsers(**kw) -> dict[str, str | None]:
        return {i.llm: (lambda a: a[a.index("--tool-call-parser") + 1] if "--tool-call-parser" in a else None)(
            engine_argv(i.launch)) for i in serve_config(plan, wf, models, gpus, placement, engine="vllm", **kw).instances}

    assert parsers() == {"generator": "pythonic", "rewriter": None, "reranker": "hermes"}   # plan over catalog
    assert parsers(parsers={"*": {"tool_call_parser": "hermes"}, "generator": {"tool_call_parser": "llama3_json"}}) == \
        {"generator": "llama3_json", "rewriter": "hermes", "reranker": "hermes"}              # the CLI over the plan
    with pytest.raises(SpecError, match="parser override for genrator: the plan has no such LLM"):
        parsers(parsers={"genrator": {"tool_call_parser": "hermes"}})
    with pytest.raises(SpecError, match="tool_call_parser='llama4_jsn' is not a name vllm registers"):
        parsers(parsers={"*": {"tool_call_parser": "llama4_jsn"}})


def test_the_cli_parser_flags_parse_llm_and_name() -> None:
    import argparse

    from scepsy_hpc.commands.argtypes import parser_override

    assert parser_override("generator=hermes") == ("generator", "hermes")
    assert parser_override("hermes") == ("*", "hermes")
    assert parser_override("/opt/t=1.jinja") == ("*", "/opt/t=1.jinja")
    with pytest.raises(argparse.ArgumentTypeError, match="give NAME or LLM=NAME"):
        parser_override("generator=")
