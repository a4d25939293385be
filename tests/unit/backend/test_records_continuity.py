"""Files written before the watchdog and drain fields existed still load, with those fields' defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scepsy_hpc.backend.records import RERUN, AgentReport, ServeConfig
from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.records import read_record

OLD_SERVE = {"schema_version": 1, "engine": "sim", "health_timeout_s": 30.0, "max_restarts": 5,
             "restart_window_s": 600.0, "instances": []}
OLD_REPORT = {"schema_version": 1, "node": "n1", "host": "h", "pid": 7, "state": "ready", "updated": 1.0, "instances": [
    {"llm": "a", "replica": 0, "gpus": [0], "gpu_frac": 1.0, "mps_pct": 100, "restarts": 2}]}


def test_old_serve_json_and_reports_load_with_the_new_defaults(tmp_path: Path) -> None:
    (tmp_path / "serve.json").write_text(json.dumps(OLD_SERVE))
    (tmp_path / "n1.json").write_text(json.dumps(OLD_REPORT))
    config = read_record(tmp_path / "serve.json", ServeConfig, RERUN)
    report = read_record(tmp_path / "n1.json", AgentReport, RERUN)
    assert (config.progress_check_s, config.stall_timeout_s) == (5.0, 120.0)
    assert report.draining_since is None
    inst = report.instances[0]
    assert inst.restarts == 2 and inst.last_restart_reason == "" and inst.last_restart_at is None


def test_a_watchdog_period_of_zero_is_refused(tmp_path: Path) -> None:
    (tmp_path / "serve.json").write_text(json.dumps({**OLD_SERVE, "progress_check_s": 0}))
    with pytest.raises(SpecError) as exc:
        read_record(tmp_path / "serve.json", ServeConfig, RERUN)
    assert "progress_check_s" in str(exc.value)
