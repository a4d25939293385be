"""Loading `driver.entrypoint` and reading `driver.inputs`: every mistake is a SpecError that says where and how to fix it."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

from scepsy_hpc.drive import drive_entrypoint, load_entrypoint, read_inputs
from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.workflow import workflow_from_text

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.write_text(textwrap.dedent(text))
    return p


def test_loads_a_function_from_the_workflow_directory_and_leaves_sys_path_as_it_was(tmp_path):
    _write(tmp_path, "scepsy_ep_ok.py", "def run(input, base_url):\n    return input['x'] + 1\n")
    before = list(sys.path)
    fn = load_entrypoint("scepsy_ep_ok:run", tmp_path)
    assert fn({"x": 1}, "http://x/v1") == 2
    assert sys.path == before


def test_missing_module_names_the_entrypoint_and_the_fix(tmp_path):
    with pytest.raises(SpecError) as exc:
        load_entrypoint("scepsy_no_such_module:run", tmp_path)
    msg = str(exc.value)
    assert "'scepsy_no_such_module:run'" in msg and str(tmp_path.resolve()) in msg
    assert "scepsy_no_such_module.py beside the workflow file" in msg


def test_missing_function_lists_what_the_module_has(tmp_path):
    _write(tmp_path, "scepsy_ep_nofn.py", "def main(input, base_url):\n    pass\n")
    with pytest.raises(SpecError) as exc:
        load_entrypoint("scepsy_ep_nofn:run", tmp_path)
    msg = str(exc.value)
    assert "has no 'run'" in msg and "functions there: main" in msg and "scepsy_ep_nofn.py" in msg


def test_not_callable_and_bad_format_and_broken_import(tmp_path):
    _write(tmp_path, "scepsy_ep_const.py", "run = 3\n")
    with pytest.raises(SpecError) as not_callable:
        load_entrypoint("scepsy_ep_const:run", tmp_path)
    with pytest.raises(SpecError) as bad_format:
        load_entrypoint("scepsy_ep_const.run", tmp_path)
    _write(tmp_path, "scepsy_ep_dep.py", "import scepsy_missing_dependency\n")
    with pytest.raises(SpecError) as missing_dep:
        load_entrypoint("scepsy_ep_dep:run", tmp_path)
    _write(tmp_path, "scepsy_ep_raises.py", "raise RuntimeError('boom at import')\n")
    with pytest.raises(SpecError) as raises:
        load_entrypoint("scepsy_ep_raises:run", tmp_path)
    assert "is a int, not a function" in str(not_callable.value)
    assert "expected 'module:function'" in str(bad_format.value)
    assert "pip install scepsy_missing_dependency" in str(missing_dep.value)
    assert "RuntimeError: boom at import" in str(raises.value)


def test_same_module_name_in_two_workflow_directories_loads_each(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _write(a, "scepsy_ep_agent.py", "def run(input, base_url):\n    return 'a'\n")
    _write(b, "scepsy_ep_agent.py", "def run(input, base_url):\n    return 'b'\n")
    assert load_entrypoint("scepsy_ep_agent:run", a)({}, "") == "a"
    assert load_entrypoint("scepsy_ep_agent:run", b)({}, "") == "b"
    assert load_entrypoint("scepsy_ep_agent:run", a)({}, "") == "a"


def test_both_examples_load_although_both_modules_are_called_agent():
    fan = load_entrypoint("agent:run", EXAMPLES / "openai_fanout")
    graph = load_entrypoint("agent:run", EXAMPLES / "langgraph_agent")
    assert asyncio.iscoroutinefunction(fan) and not asyncio.iscoroutinefunction(graph)
    assert fan.__module__ == graph.__module__ == "agent" and fan is not graph


def test_read_inputs_parses_objects_and_skips_blank_lines(tmp_path):
    p = _write(tmp_path, "in.jsonl", '{"q": 1}\n\n{"q": 2}\n')
    assert read_inputs(p) == [{"q": 1}, {"q": 2}]


@pytest.mark.parametrize("text, where, what", [
    ('{"q": 1}\n{"q": \n', ":2:", "not JSON"),
    ('{"q": 1}\n\n[1, 2]\n', ":3:", "expected a JSON object"),
    ("\n\n", "in.jsonl:", "no inputs"),
])
def test_read_inputs_errors_cite_file_and_line(tmp_path, text, where, what):
    p = _write(tmp_path, "in.jsonl", text)
    with pytest.raises(SpecError) as exc:
        read_inputs(p)
    assert where in str(exc.value) and what in str(exc.value)


def test_read_inputs_missing_file(tmp_path):
    with pytest.raises(SpecError) as exc:
        read_inputs(tmp_path / "nope.jsonl")
    assert "nope.jsonl: cannot read driver inputs" in str(exc.value)


def test_drive_entrypoint_records_exceptions_per_request_and_goes_on(tmp_path):
    """Without a gateway (nothing listens) spans fail but the program runs; request 1 raises, 0 and 2 succeed."""
    _write(tmp_path, "scepsy_ep_flaky.py", """\
        seen = []
        def run(input, base_url):
            seen.append((input["i"], base_url))
            if input["i"] == 1:
                raise ValueError("bad input")
            input["i"] = -1  # must not leak into later requests
        """)
    _write(tmp_path, "in.jsonl", '{"i": 0}\n{"i": 1}\n')
    wf = workflow_from_text("""name: flaky
llms: {m: {model: llama-3.2-1b-instruct}}
program: [{call: m, prompt_tokens: 1, output_tokens: 1}]
driver: {entrypoint: scepsy_ep_flaky:run, inputs: in.jsonl}
""")
    res = asyncio.run(drive_entrypoint(wf, tmp_path, "http://127.0.0.1:9/", n_requests=3, concurrency=2))
    import scepsy_ep_flaky
    assert sorted(scepsy_ep_flaky.seen) == [(0, "http://127.0.0.1:9/r/r-000000/v1"),
                                            (0, "http://127.0.0.1:9/r/r-000002/v1"),
                                            (1, "http://127.0.0.1:9/r/r-000001/v1")]
    assert list(res.requests) == ["r-000000", "r-000001", "r-000002"]
    program_errors = [e for e in res.errors() if "span" not in e]
    assert program_errors == ["r-000001: scepsy_ep_flaky:run: ValueError: bad input"]


def test_drive_entrypoint_without_driver_is_a_spec_error(tmp_path):
    wf = workflow_from_text("""name: nodriver
llms: {m: {model: llama-3.2-1b-instruct}}
program: [{call: m, prompt_tokens: 1, output_tokens: 1}]
""")
    with pytest.raises(SpecError) as exc:
        asyncio.run(drive_entrypoint(wf, tmp_path, "http://127.0.0.1:9", n_requests=1))
    assert "has no driver" in str(exc.value)
