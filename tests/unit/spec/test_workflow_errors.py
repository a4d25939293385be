"""Every kind of workflow-spec error names file:line, the data path, and the valid alternatives."""

from __future__ import annotations

import pytest

from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.catalog import load_models
from scepsy_hpc.spec.workflow import Workflow, workflow_from_text

PATH = "x.yaml"

# A valid workflow; tests append steps / keys to it.  Lines:
#  1 name   2 llms   3 planner   4 writer   5 tools   6 web_search
#  7 program   8 - call   9 prompt_tokens   10 output_tokens
BASE = """\
name: t
llms:
  planner: {model: llama-3.1-8b-instruct}
  writer: {model: qwen2.5-7b-instruct}
tools:
  web_search: {latency_s: 0.5}
program:
  - call: planner
    prompt_tokens: 100
    output_tokens: 10
"""


@pytest.fixture(scope="module")
def models():
    return load_models()


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the nth line containing `needle` (the expected line of an error)."""
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) >= nth, f"{needle!r} not in test text"
    return hits[nth - 1]


def problems_of(text: str, models=None) -> list[str]:
    with pytest.raises(SpecError) as ei:
        workflow_from_text(text, models=models, path=PATH)
    exc = ei.value
    assert exc.problems, "SpecError without problems"
    assert str(exc) == "\n".join(exc.problems)
    return exc.problems


def only_problem(text: str, models=None) -> str:
    problems = problems_of(text, models)
    assert len(problems) == 1, problems
    return problems[0]


def test_base_is_valid(models):
    wf = workflow_from_text(BASE, models=models, path=PATH)
    assert isinstance(wf, Workflow)
    assert wf.name == "t"
    assert set(wf.llms) == {"planner", "writer"}


# --- unknown keys -------------------------------------------------------------------------------

def test_unknown_top_level_key():
    text = BASE + "colour: red\n"
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'colour:')}: colour: ")
    assert "unknown key 'colour'" in p
    for valid in ("define", "description", "driver", "llms", "max_depth", "name", "program", "target", "tools"):
        assert valid in p


def test_unknown_key_in_call_step_lists_valid_keys():
    text = BASE.replace("    output_tokens: 10\n", "    output_tokens: 10\n    temperature: 0.5\n")
    p = only_problem(text)
    assert "unknown key 'temperature'" in p
    assert "valid keys here: call, context, output_tokens, prompt_tokens, role, shared_prefix_tokens" in p
    assert p.startswith(f"{PATH}:"), p


def test_unknown_key_in_call_step_names_its_own_line():
    text = BASE.replace("    output_tokens: 10\n", "    output_tokens: 10\n    temperature: 0.5\n")
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'temperature:')}: program[0].temperature: "), p


def test_unknown_key_in_fanout_names_its_line():
    text = BASE + "  - fanout:\n      count: 2\n      body: []\n      bogus: 1\n"
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'bogus:')}: program[1].fanout.bogus: "), p
    assert "unknown key 'bogus'" in p
    assert "valid keys here: body, count" in p


# --- step kinds -----------------------------------------------------------------------------------

STEP_KEYS = "call, tool, parallel, fanout, loop, branch, use"


def test_misspelt_step_kind():
    text = BASE + "  - tol: web_search\n"
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'tol: web_search')}: program[1]: "), p
    assert f"exactly one of the keys: {STEP_KEYS}" in p


def test_step_with_two_step_keys():
    text = BASE + "  - tool: web_search\n    use: sub\ndefine:\n  sub: [{tool: web_search}]\n"
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, '- tool: web_search')}: program[1]: "), p
    assert "exactly one of the keys" in p
    assert STEP_KEYS in p


# --- unknown names --------------------------------------------------------------------------------

def test_unknown_llm_in_call_suggests_and_lists():
    text = BASE + "  - call: planer\n    prompt_tokens: 1\n    output_tokens: 1\n"
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, '- call: planer')}: program[1].call: "), p
    assert "unknown LLM 'planer'" in p
    assert "did you mean 'planner'?" in p
    assert "known: planner, writer" in p
    assert "llms:" in p


def test_unknown_tool_name():
    text = BASE + "  - tool: websearch\n"
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'tool: websearch')}: program[1].tool: "), p
    assert "unknown tool 'websearch'" in p
    assert "did you mean 'web_search'?" in p
    assert "known: web_search" in p


def test_unknown_tool_when_no_tools_declared():
    text = BASE.replace("tools:\n  web_search: {latency_s: 0.5}\n", "") + "  - tool: grep\n"
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'tool: grep')}: program[1].tool: "), p
    assert "unknown tool 'grep'" in p
    assert "no tools are declared" in p


def test_unknown_use_name():
    text = BASE + "  - use: sub_questoin\ndefine:\n  sub_question:\n    - tool: web_search\n"
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'use: sub_questoin')}: program[1].use: "), p
    assert "unknown sub-program 'sub_questoin'" in p
    assert "did you mean 'sub_question'?" in p
    assert "known: sub_question" in p
    assert "define:" in p


def test_unknown_use_name_nothing_defined():
    text = BASE + "  - use: nope\n"
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'use: nope')}: program[1].use: "), p
    assert "unknown sub-program 'nope'" in p
    assert "nothing is defined" in p


def test_unknown_model_with_catalog(models):
    text = BASE.replace("llama-3.1-8b-instruct", "llama-3.1-8b-instuct")
    p = only_problem(text, models)
    assert p.startswith(f"{PATH}:{line_of(text, 'planner: {model:')}: llms.planner.model: "), p
    assert "unknown model 'llama-3.1-8b-instuct'" in p
    assert "did you mean 'llama-3.1-8b-instruct'?" in p
    assert "known: " in p and "qwen2.5-7b-instruct" in p


def test_unknown_model_is_not_checked_without_catalog():
    text = BASE.replace("llama-3.1-8b-instruct", "no-such-model")
    wf = workflow_from_text(text, path=PATH)
    assert wf.llms["planner"].model == "no-such-model"


# --- values ---------------------------------------------------------------------------------------

def test_branch_probabilities_not_summing_to_one():
    text = BASE + "  - branch:\n      - {p: 0.5, body: []}\n      - {p: 0.3, body: []}\n"
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'p: 0.5')}: program[1].branch: "), p
    assert "must sum to 1" in p
    assert "0.5 + 0.3 = 0.8" in p


def test_branch_probabilities_summing_to_one_is_valid():
    text = BASE + "  - branch:\n      - {p: 0.1, body: []}\n      - {p: 0.2, body: []}\n      - {p: 0.7, body: []}\n"
    wf = workflow_from_text(text, path=PATH)
    assert [arm.p for arm in wf.program[1].branch] == [0.1, 0.2, 0.7]


def test_negative_number():
    text = BASE.replace("prompt_tokens: 100", "prompt_tokens: -3")
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'prompt_tokens: -3')}: program[0].prompt_tokens: "), p
    assert "greater than or equal to 0" in p
    assert "(got -3)" in p


def test_non_numeric_value_lists_distribution_kinds():
    text = BASE.replace("output_tokens: 10", "output_tokens: abc")
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'output_tokens: abc')}: program[0].output_tokens: "), p
    assert "non-negative number" in p
    for kind in ("constant", "uniform", "uniform_int", "normal", "lognormal", "geometric", "poisson",
                 "exponential", "choice"):
        assert kind in p
    assert "'abc'" in p


def test_distribution_missing_parameter():
    text = BASE.replace("output_tokens: 10", "output_tokens: {lognormal: {mean: 5}}")
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'lognormal')}: program[0].output_tokens.lognormal: "), p
    assert "missing required key 'cv'" in p


def test_uniform_low_above_high():
    text = BASE.replace("output_tokens: 10", "output_tokens: {uniform: {low: 5, high: 2}}")
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'uniform:')}: program[0].output_tokens.uniform: "), p
    assert "low (5) must not exceed high (2)" in p
    assert "swap" in p


def test_choice_weights_length_mismatch():
    text = BASE.replace("output_tokens: 10", "output_tokens: {choice: {values: [1, 2, 3], weights: [1, 2]}}")
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'choice:')}: program[0].output_tokens.choice: "), p
    assert "weights has 2 entries but values has 3" in p


def test_nested_distribution_parameter_line():
    text = BASE.replace("output_tokens: 10", "output_tokens:\n      normal:\n        mean: 5\n        sd: -1")
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'sd: -1')}: program[0].output_tokens.normal.sd: "), p
    assert "(got -1)" in p


# --- recursion ------------------------------------------------------------------------------------

DIRECT = BASE + "  - use: a\ndefine:\n  a:\n    - tool: web_search\n    - use: a\n"
INDIRECT = BASE + "  - use: a\ndefine:\n  a:\n    - use: b\n  b:\n    - use: a\n"


def test_direct_recursion_without_max_depth():
    p = only_problem(DIRECT)
    assert p.startswith(f"{PATH}:{line_of(DIRECT, '  a:')}: define.a: "), p
    assert "recursion without a bound" in p
    assert "(a -> a)" in p
    assert "max_depth" in p


def test_indirect_recursion_without_max_depth():
    p = only_problem(INDIRECT)
    assert p.startswith(f"{PATH}:{line_of(INDIRECT, '  a:')}: define.a: "), p
    assert "recursion without a bound" in p
    assert "(a -> b -> a)" in p
    assert "max_depth" in p


@pytest.mark.parametrize("text", [DIRECT, INDIRECT], ids=["direct", "indirect"])
def test_recursion_with_max_depth_is_valid(text):
    wf = workflow_from_text(text + "max_depth: 3\n", path=PATH)
    assert wf.max_depth == 3
    assert set(wf.define) >= {"a"}


def test_non_recursive_define_reuse_is_valid():
    text = BASE + "  - use: a\n  - use: a\ndefine:\n  a:\n    - use: b\n  b:\n    - tool: web_search\n"
    wf = workflow_from_text(text, path=PATH)
    assert wf.max_depth is None


# --- YAML-level errors ----------------------------------------------------------------------------

def test_yaml_syntax_error_unclosed_bracket_names_a_line():
    text = BASE + "  - {call: planner, prompt_tokens: [1, 2\n  - tool: web_search\n"
    p = only_problem(text)
    assert "YAML syntax error" in p
    opened = line_of(text, "prompt_tokens: [1, 2")
    # PyYAML detects the error where the bracket should have closed: the opening line or the next.
    assert any(p.startswith(f"{PATH}:{n}: ") for n in (opened, opened + 1)), p
    assert "']'" in p


def test_yaml_syntax_error_bad_indentation_exact_line():
    text = BASE.replace("    output_tokens: 10", "   output_tokens: 10")
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'output_tokens: 10')}: YAML syntax error: "), p


def test_duplicate_key_names_both_lines():
    text = BASE + "name: u\n"
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'name: u')}: "), p
    assert "duplicate key 'name'" in p
    assert f"first at line {line_of(text, 'name: t')}" in p


def test_duplicate_key_nested():
    text = BASE.replace("    output_tokens: 10\n", "    output_tokens: 10\n    prompt_tokens: 7\n")
    p = only_problem(text)
    assert p.startswith(f"{PATH}:{line_of(text, 'prompt_tokens: 7')}: "), p
    assert "duplicate key 'prompt_tokens'" in p
    assert f"first at line {line_of(text, 'prompt_tokens: 100')}" in p


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"], ids=["empty", "newline", "comment"])
def test_empty_file(text):
    p = only_problem(text)
    assert p.startswith(f"{PATH}:"), p
    assert "empty" in p
    assert "mapping" in p


def test_top_level_list_instead_of_mapping():
    p = only_problem("- name: t\n- llms: {}\n")
    assert p.startswith(f"{PATH}:1: "), p
    assert "mapping" in p
    for key in ("name", "llms", "program"):
        assert key in p


def test_missing_required_top_level_keys():
    text = "name: t\nprogram:\n  - tool: x\n"
    problems = problems_of(text)
    assert any("missing required key 'llms'" in p for p in problems), problems


# --- several problems at once ---------------------------------------------------------------------

def test_several_validation_errors_all_reported():
    text = BASE.replace("prompt_tokens: 100", "prompt_tokens: -1").replace("output_tokens: 10", "output_tokens: abc")
    text += "  - tol: 1\n  - branch:\n      - {p: 0.5, body: []}\n"
    problems = problems_of(text)
    assert len(problems) == 4, problems
    assert problems[0].startswith(f"{PATH}:{line_of(text, 'prompt_tokens: -1')}: program[0].prompt_tokens")
    assert problems[1].startswith(f"{PATH}:{line_of(text, 'output_tokens: abc')}: program[0].output_tokens")
    assert problems[2].startswith(f"{PATH}:{line_of(text, 'tol: 1')}: program[1]")
    assert problems[3].startswith(f"{PATH}:{line_of(text, 'p: 0.5')}: program[2].branch")


def test_several_reference_errors_all_reported(models):
    text = BASE.replace("qwen2.5-7b-instruct", "qwen-7b") + (
        "  - call: planer\n    prompt_tokens: 1\n    output_tokens: 1\n"
        "  - tool: websearch\n"
        "  - use: nope\n"
    )
    problems = problems_of(text, models)
    assert len(problems) == 4, problems
    text_all = "\n".join(problems)
    assert f"{PATH}:{line_of(text, '- call: planer')}: program[1].call: unknown LLM 'planer'" in text_all
    assert f"{PATH}:{line_of(text, 'tool: websearch')}: program[2].tool: unknown tool 'websearch'" in text_all
    assert f"{PATH}:{line_of(text, 'use: nope')}: program[3].use: unknown sub-program 'nope'" in text_all
    assert f"{PATH}:{line_of(text, 'writer: {model')}: llms.writer.model: unknown model 'qwen-7b'" in text_all


def test_unknown_key_does_not_hide_other_errors():
    text = BASE.replace("prompt_tokens: 100", "prompt_tokens: -1") + "colour: red\n"
    problems = problems_of(text)
    assert len(problems) == 2, problems
