"""run_entry: how every entry point (`scepsy`, the gateway, the engine server) reports a failure."""

from __future__ import annotations

import json

import pytest

from scepsy_hpc.errors import InfeasibleError, ScepsyError, SpecError, run_entry


def _raise(exc: BaseException):
    def body() -> int:
        raise exc
    return body


def test_success_returns_the_body_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_entry(lambda: None) == 0 and run_entry(lambda: 4) == 4
    assert capsys.readouterr() == ("", "")


def test_scepsy_error_is_one_line_and_its_exit_code(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCEPSY_DEBUG", raising=False)
    assert run_entry(_raise(InfeasibleError("plan needs 6 GPUs; 4 are free"))) == 3
    out, err = capsys.readouterr()
    assert err == "error: plan needs 6 GPUs; 4 are free\n" and out == ""
    assert run_entry(_raise(ScepsyError("boom")), prog="scepsy engine-sim") == 1
    assert capsys.readouterr().err == "scepsy engine-sim: error: boom\n"


def test_spec_error_prints_its_problems(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCEPSY_DEBUG", raising=False)
    assert run_entry(_raise(SpecError(["wf.yaml:3: unknown key 'lms'", "wf.yaml:9: rate must be > 0"]))) == 2
    assert capsys.readouterr().err == "wf.yaml:3: unknown key 'lms'\nwf.yaml:9: rate must be > 0\n"


def test_json_errors_also_print_one_document_on_stdout(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCEPSY_DEBUG", raising=False)
    assert run_entry(_raise(InfeasibleError("too few GPUs")), json_errors=True) == 3
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": {"type": "InfeasibleError", "message": "too few GPUs", "exit_code": 3}}
    assert err == "error: too few GPUs\n"


def test_keyboard_interrupt_is_130_quietly(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCEPSY_DEBUG", raising=False)
    assert run_entry(_raise(KeyboardInterrupt())) == 130
    assert capsys.readouterr() == ("", "")


def test_debug_keeps_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCEPSY_DEBUG", "1")
    with pytest.raises(SpecError) as exc:
        run_entry(_raise(SpecError("x:1: bad")))
    assert exc.value.problems == ["x:1: bad"]
    with pytest.raises(KeyboardInterrupt):
        run_entry(_raise(KeyboardInterrupt()))


def test_any_other_exception_is_a_bug_and_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCEPSY_DEBUG", raising=False)
    with pytest.raises(ZeroDivisionError) as exc:
        run_entry(_raise(ZeroDivisionError("division by zero")))
    assert str(exc.value) == "division by zero"
