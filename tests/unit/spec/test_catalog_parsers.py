"""Catalog parser fields: the shipped names are ones the engines register; bad ones name file:line."""

from __future__ import annotations

import pytest
import yaml

from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.catalog import (
    KNOWN_REASONING_PARSERS,
    KNOWN_TOOL_CALL_PARSERS,
    PARSER_ENGINES,
    config_dir,
    load_models,
)

MODEL = """\
m1:
  hf_id: org/m1
  params_b: 1.0
  layers: 2
  hidden: 64
  intermediate: 128
  heads: 4
  kv_heads: 2
  head_dim: 16
  vocab: 1000
  max_model_len: 2048
"""


def _problems(tmp_path, extra: str) -> tuple[str, list[str]]:
    path = tmp_path / "models.yaml"
    path.write_text(MODEL + extra)
    with pytest.raises(SpecError) as ei:
        load_models(path)
    return str(path), ei.value.problems


def test_every_shipped_parser_name_is_registered_by_its_engine():
    """Read the YAML itself (not through the validator) so a typo fails here by name, without vllm."""
    raw = yaml.safe_load((config_dir() / "models.yaml").read_text())
    seen = 0
    for key, fields in raw.items():
        for field, known in (("tool_call_parser", KNOWN_TOOL_CALL_PARSERS),
                             ("reasoning_parser", KNOWN_REASONING_PARSERS)):
            for engine, name in (fields.get(field) or {}).items():
                assert engine in PARSER_ENGINES, (key, field, engine)
                assert name in known[engine], f"{key}: {field}.{engine}={name!r} is not in {engine}'s registry"
                seen += 1
    assert seen >= 22  # 11 tool-calling models x 2 engines


@pytest.mark.parametrize("key, vllm, sglang", [
    ("llama-3.1-8b-instruct", "llama3_json", "llama3"),
    ("llama-3.2-1b-instruct", "llama3_json", "llama3"),
    ("qwen2.5-7b-instruct", "hermes", "qwen25"),
    ("qwen2.5-coder-32b-instruct", "hermes", "qwen25"),
    ("mistral-7b-instruct-v0.3", "mistral", "mistral"),
])
def test_shipped_tool_parsers(key, vllm, sglang):
    parser = load_models()[key].tool_call_parser
    assert (parser.name_for("vllm"), parser.name_for("sglang"), parser.name_for("sim")) == (vllm, sglang, None)


def test_models_without_a_tool_format_name_none():
    models = load_models()
    assert models["mixtral-8x7b-instruct"].tool_call_parser is None     # v0.1 tokenizer: no [TOOL_CALLS]
    assert models["qwen2.5-math-prm-7b"].tool_call_parser is None       # a reward model
    assert all(m.reasoning_parser is None and m.chat_template is None for m in models.values())


def test_a_catalog_with_all_three_fields_loads(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(MODEL + "  tool_call_parser: {vllm: hermes, sglang: qwen25}\n"
                            "  reasoning_parser: {vllm: deepseek_r1, sglang: deepseek-r1}\n"
                            "  chat_template: templates/tool.jinja\n")
    m = load_models(path)["m1"]
    assert m.tool_call_parser.vllm == "hermes" and m.reasoning_parser.name_for("sglang") == "deepseek-r1"
    assert m.chat_template == "templates/tool.jinja"


@pytest.mark.parametrize("extra, line, needles", [
    # a typo: the engines' names for one format differ, and the other engine's is not accepted
    ("  tool_call_parser: {vllm: llama3, sglang: llama3}\n", 12,
     ["m1.tool_call_parser.vllm", "'llama3' is not a tool-call parser vllm knows; did you mean 'llama3_json'?"]),
    ("  tool_call_parser: {vllm: hermes, sglang: llama3_json}\n", 12,
     ["m1.tool_call_parser.sglang", "'llama3_json' is not a tool-call parser sglang knows"]),
    ("  reasoning_parser:\n    sglang: deepseek_r1\n", 13,
     ["m1.reasoning_parser.sglang", "'deepseek_r1' is not a reasoning parser sglang knows", "deepseek-r1"]),
    ("  tool_call_parser: {vllm: hermes, trtllm: x}\n", 12, ["unknown key 'trtllm'", "valid keys here: sglang, vllm"]),
    ("  tool_call_parser: hermes\n", 12,      # a bare name: which engine's?
     ["m1.tool_call_parser", "give the tool-call parser per engine, e.g. {vllm: hermes, sglang: ...}"]),
    ("  tool_call_parser: {}\n", 12, ["name the tool-call parser for vllm, sglang or both"]),
    ("  chat_template: ''\n", 12, ["m1.chat_template", "must be a non-empty path or template name"]),
    ("  chat_template: \"a\\nb\"\n", 12, ["m1.chat_template", "on one line"]),
    ("  tool_parser: {vllm: hermes}\n", 12, ["unknown key 'tool_parser'", "tool_call_parser"]),
])
def test_bad_parser_fields_name_file_and_line(tmp_path, extra, line, needles):
    path, problems = _problems(tmp_path, extra)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:{line}:"), problems[0]
    for needle in needles:
        assert needle in problems[0], problems[0]
