"""Output-parser flags of engine launches: filled from the catalog, overridable, checked, and (where the
engines are installed) accepted by the engines' own argument parsers and registries."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from scepsy_hpc.engine.adapters import EngineLaunch, check_launch, engine_argv, parser_fields
from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.catalog import KNOWN_REASONING_PARSERS, KNOWN_TOOL_CALL_PARSERS, load_models

PY = "/opt/venv/bin/python"
MODELS = load_models()


def _launch(engine: str, model: str = "llama-3.1-8b-instruct", **overrides) -> EngineLaunch:
    spec = MODELS[model]
    return EngineLaunch(engine=engine, model=model, hf_id=spec.hf_id, served_name="agent", gpu="h100-sxm",
                        **parser_fields(spec, engine, **overrides))


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


@pytest.mark.parametrize("engine, model, name", [
    ("vllm", "llama-3.1-8b-instruct", "llama3_json"), ("sglang", "llama-3.1-8b-instruct", "llama3"),
    ("vllm", "qwen2.5-72b-instruct", "hermes"), ("sglang", "qwen2.5-72b-instruct", "qwen25"),
    ("vllm", "mistral-7b-instruct-v0.3", "mistral"), ("sglang", "mistral-7b-instruct-v0.3", "mistral"),
])
def test_the_catalog_parser_reaches_the_command_line(engine, model, name):
    argv = engine_argv(_launch(engine, model), python=PY)
    assert _flag(argv, "--tool-call-parser") == name
    # vLLM needs both flags for tool_choice "auto"; SGLang has no --enable-auto-tool-choice at all
    assert ("--enable-auto-tool-choice" in argv) == (engine == "vllm")
    assert "--reasoning-parser" not in argv and "--chat-template" not in argv


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_a_model_without_a_tool_format_gets_no_tool_flags(engine):
    argv = engine_argv(_launch(engine, "mixtral-8x7b-instruct"), python=PY)
    assert not {"--enable-auto-tool-choice", "--tool-call-parser"} & set(argv)


def test_overrides_win_over_the_catalog():
    fields = parser_fields(MODELS["qwen2.5-7b-instruct"], "vllm", tool_call_parser="qwen3_xml",
                           reasoning_parser="qwen3", chat_template="/t/tool.jinja")
    assert fields == {"tool_call_parser": "qwen3_xml", "reasoning_parser": "qwen3", "chat_template": "/t/tool.jinja"}
    argv = engine_argv(_launch("vllm", "qwen2.5-7b-instruct", tool_call_parser="qwen3_xml", reasoning_parser="qwen3",
                               chat_template="/t/tool.jinja"), python=PY)
    assert (_flag(argv, "--tool-call-parser"), _flag(argv, "--reasoning-parser"),
            _flag(argv, "--chat-template")) == ("qwen3_xml", "qwen3", "/t/tool.jinja")
    assert parser_fields(MODELS["qwen2.5-7b-instruct"], "vllm")["tool_call_parser"] == "hermes"


def test_the_sim_engine_takes_no_parser_flags():
    assert parser_fields(MODELS["llama-3.1-8b-instruct"], "sim", tool_call_parser="hermes") == {
        "tool_call_parser": None, "reasoning_parser": None, "chat_template": None}
    forced = dataclasses.replace(_launch("sim"), tool_call_parser="hermes", reasoning_parser="x", chat_template="t")
    argv = engine_argv(forced, python=PY)
    assert not {"--tool-call-parser", "--reasoning-parser", "--chat-template", "hermes"} & set(argv)


def test_extra_args_come_after_the_parser_flags_so_they_win():
    launch = dataclasses.replace(_launch("vllm"), extra_args=("--tool-call-parser", "pythonic"))
    argv = engine_argv(launch, python=PY)
    assert argv[-2:] == ["--tool-call-parser", "pythonic"] and argv.index("llama3_json") < len(argv) - 2


@pytest.mark.parametrize("engine, change, message", [
    ("sglang", dict(tool_call_parser="llama3_json"),
     "tool_call_parser='llama3_json' is not a name sglang registers"),
    ("vllm", dict(tool_call_parser="llama3"), "tool_call_parser='llama3' is not a name vllm registers"),
    ("vllm", dict(reasoning_parser="deepseek-r1"), "reasoning_parser='deepseek-r1' is not a name vllm registers"),
    ("vllm", dict(chat_template="a\nb"), "must be a non-empty path or template name on one line"),
    ("sglang", dict(chat_template=" "), "must be a non-empty path or template name on one line"),
])
def test_check_launch_refuses_names_the_engine_does_not_register(engine, change, message):
    with pytest.raises(SpecError) as exc:
        check_launch(dataclasses.replace(_launch(engine), **change))
    assert message in str(exc.value) and "engine 'agent'" in str(exc.value)


def test_check_launch_ignores_parser_fields_of_the_sim_engine():
    check_launch(dataclasses.replace(_launch("sim"), tool_call_parser="no-such-parser"))


# --- the engines' own parsers, where installed ------------------------------------------------------------

def _vllm_names(manager: object, attrs: tuple[str, ...]) -> set[str]:
    """Registered names across vLLM versions (list_registered() in new ones, dicts in older ones)."""
    names = set(manager.list_registered()) if hasattr(manager, "list_registered") else set()
    for attr in attrs:
        names |= set(getattr(manager, attr, {}) or {})
    return names


def test_vllm_accepts_our_command_line_and_knows_our_parser_names(tmp_path):
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # vLLM before the utils split
        from vllm.utils import FlexibleArgumentParser
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:  # vLLM before tool_parsers moved out of entrypoints
        from vllm.entrypoints.openai.tool_parsers import ToolParserManager
    from vllm.reasoning import ReasoningParserManager

    tool_names = _vllm_names(ToolParserManager, ("tool_parsers", "lazy_parsers"))
    reasoning_names = _vllm_names(ReasoningParserManager, ("reasoning_parsers", "lazy_parsers"))
    used = {m.tool_call_parser.vllm for m in MODELS.values() if m.tool_call_parser and m.tool_call_parser.vllm}
    assert used and used <= tool_names, used - tool_names
    assert used <= KNOWN_TOOL_CALL_PARSERS["vllm"]
    missing = {"qwen3", "deepseek_r1"} - reasoning_names   # the reasoning names our docs and tests use
    assert not missing, missing

    template = tmp_path / "tool.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    launch = dataclasses.replace(_launch("vllm", "qwen2.5-7b-instruct"), reasoning_parser="deepseek_r1",
                                 chat_template=str(template))
    argv = engine_argv(launch, python=PY)
    assert argv[:2] == ["vllm", "serve"]
    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args([*argv[3:], "--model", argv[2]])   # `vllm serve`'s positional model_tag
    assert args.enable_auto_tool_choice is True
    assert (args.tool_call_parser, args.reasoning_parser, args.chat_template) == (
        "hermes", "deepseek_r1", str(template))
    try:
        from vllm.entrypoints.openai.cli_args import validate_parsed_serve_args
    except ImportError:
        return
    validate_parsed_serve_args(args)   # vLLM's own check of the tool/reasoning flags together


def test_sglang_accepts_our_command_line_and_knows_our_parser_names():
    pytest.importorskip("sglang")
    from sglang.srt.function_call.function_call_parser import FunctionCallParser
    from sglang.srt.server_args import ServerArgs
    try:
        from sglang.srt.parser.reasoning_parser import ReasoningParser
    except ImportError:  # older SGLang
        from sglang.srt.reasoning_parser import ReasoningParser

    used = {m.tool_call_parser.sglang for m in MODELS.values() if m.tool_call_parser and m.tool_call_parser.sglang}
    registered = set(FunctionCallParser.ToolCallParserEnum)
    assert used and used <= registered, used - registered
    assert {"qwen3", "deepseek-r1"} <= set(ReasoningParser.DetectorMap)

    argv = engine_argv(dataclasses.replace(_launch("sglang"), reasoning_parser="qwen3"), python=PY)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv[3:])
    assert (args.tool_call_parser, args.reasoning_parser) == ("llama3", "qwen3")


def test_the_known_name_lists_hold_what_the_catalog_and_docs_use():
    """The lists were copied by hand from the registries; these names must survive any refresh."""
    assert {"llama3_json", "hermes", "mistral", "pythonic"} <= KNOWN_TOOL_CALL_PARSERS["vllm"]
    assert {"llama3", "qwen25", "hermes", "mistral"} <= KNOWN_TOOL_CALL_PARSERS["sglang"]
    assert {"deepseek_r1", "qwen3"} <= KNOWN_REASONING_PARSERS["vllm"]
    assert {"deepseek-r1", "qwen3"} <= KNOWN_REASONING_PARSERS["sglang"]
