"""serve.json, agent reports and session records: they round-trip through their files, and a file
from another version, a foreign or a broken one is a SpecError naming the file and saying what to do."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from scepsy_hpc.backend.records import AgentReport, InstanceReport, ServeConfig, ServeInstance
from scepsy_hpc.backend.session import Session
from scepsy_hpc.engine.adapters import EngineLaunch
from scepsy_hpc.errors import SpecError


def _config() -> ServeConfig:
    launch = EngineLaunch("sim", "llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", "gen", "h100-sxm",
                          gpu_frac=0.5, mem_frac=0.45, port=8101, extra_args=("--x", "1"))
    return ServeConfig(engine="sim", health_timeout_s=120.0, instances=[
        ServeInstance(llm="gen", replica=0, node="n1", gpus=[0], gpu_frac=0.5, mps_pct=50, port=8101, launch=launch)])


def _report(state: str = "ready", healthy: bool = True) -> AgentReport:
    return AgentReport(node="n1", host="h", pid=42, state=state, updated=1.0, instances=[
        InstanceReport(llm="gen", replica=0, gpus=[0], gpu_frac=0.5, mps_pct=50, url="http://h:8101", healthy=healthy,
                       state="healthy" if healthy else "starting")])


def test_serve_config_round_trips_with_its_launch_fields(tmp_path: Path) -> None:
    session = Session(tmp_path / "demo")
    session.write_serve_config(_config())
    back = session.serve_config()
    assert back == _config()
    assert back.instances[0].launch.extra_args == ("--x", "1")   # a tuple again, as the engine command needs
    assert stat.S_IMODE(session.serve_path.stat().st_mode) == 0o600


def test_agent_reports_round_trip_by_node(tmp_path: Path) -> None:
    from scepsy_hpc.spec.records import write_record

    session = Session(tmp_path / "demo")
    write_record(session.dir / "agents" / "n1.json", _report())
    assert session.agents() == {"n1": _report()}


def test_serve_json_from_another_version_says_to_rerun_up(tmp_path: Path) -> None:
    session = Session(tmp_path / "demo")
    session.dir.mkdir()
    data = json.loads(_config().model_dump_json())
    session.serve_path.write_text(json.dumps({**data, "schema_version": 0}))
    with pytest.raises(SpecError) as err:
        session.serve_config()
    assert str(session.serve_path) in str(err.value) and "re-run `scepsy up`" in str(err.value)


def test_a_foreign_agent_report_names_the_file_and_the_field(tmp_path: Path) -> None:
    session = Session(tmp_path / "demo")
    (session.dir / "agents").mkdir(parents=True)
    bad = json.loads(_report().model_dump_json())
    bad["instances"][0]["healthy"] = "very"
    (session.dir / "agents" / "n1.json").write_text(json.dumps(bad))
    with pytest.raises(SpecError) as err:
        session.agents()
    assert f"{session.dir / 'agents' / 'n1.json'}: instances.0.healthy" in str(err.value)


def test_a_garbage_serve_json_is_a_spec_error(tmp_path: Path) -> None:
    session = Session(tmp_path / "demo")
    session.dir.mkdir()
    session.serve_path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 100)
    with pytest.raises(SpecError) as err:
        session.serve_config()
    assert str(session.serve_path) in str(err.value) and "re-run `scepsy up`" in str(err.value)
