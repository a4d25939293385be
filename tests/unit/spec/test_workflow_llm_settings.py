"""A workflow's `llms` entry: the sim engine's tool-call rate (0..1, optional) and prefix caching (on by default)."""

from __future__ import annotations

import pytest

from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.catalog import load_models
from scepsy_hpc.spec.workflow import workflow_from_text

WF = """\
name: t
llms:
  agent: {{model: llama-3.1-8b-instruct{extra}}}
program:
  - call: agent
    prompt_tokens: 100
    output_tokens: 10
"""


@pytest.fixture(scope="module")
def models():
    return load_models()


def test_defaults_and_given_values(models) -> None:
    ref = workflow_from_text(WF.format(extra=""), models=models, path="wf.yaml").llms["agent"]
    assert (ref.tool_call_rate, ref.prefix_caching) == (None, True)
    ref = workflow_from_text(WF.format(extra=", tool_call_rate: 0.8, prefix_caching: false"), models=models,
                             path="wf.yaml").llms["agent"]
    assert (ref.tool_call_rate, ref.prefix_caching) == (0.8, False)
    for rate in (0, 1):
        assert workflow_from_text(WF.format(extra=f", tool_call_rate: {rate}"), models=models,
                                  path="wf.yaml").llms["agent"].tool_call_rate == rate


@pytest.mark.parametrize("extra, message", [
    (", tool_call_rate: 1.5",
     "wf.yaml:3: llms.agent.tool_call_rate: Input should be less than or equal to 1 (got 1.5)"),
    (", tool_call_rate: -0.2", "wf.yaml:3: llms.agent.tool_call_rate: Input should be greater than or equal to 0"),
    (", tool_call_rate: often", "wf.yaml:3: llms.agent.tool_call_rate: Input should be a valid number"),
    (", prefix_caching: sometimes", "wf.yaml:3: llms.agent.prefix_caching: Input should be a valid boolean"),
    (", tool_rate: 0.5", "wf.yaml:3: llms.agent.tool_rate"),
])
def test_bad_values_name_file_line_and_field(models, extra, message) -> None:
    with pytest.raises(SpecError) as exc:
        workflow_from_text(WF.format(extra=extra), models=models, path="wf.yaml")
    assert message in str(exc.value), str(exc.value)
