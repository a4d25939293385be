"""Endpoints file: parsing with file:line errors, and the watcher's reload rules."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from scepsy_hpc.errors import SpecError
from scepsy_hpc.gateway.endpoints import DEFAULT_MAX_OUTSTANDING, EndpointsWatcher, load_endpoints

GOOD = """\
time_scale: 0.05
llms:
  planner:
    served_model: llama-3.1-8b-instruct
    max_outstanding: 32
    replicas:
      - http://127.0.0.1:8001/
      - {url: http://node2:8000, max_outstanding: 4}
  coder:
    replicas: [http://node3:8000]
"""


def _write(path: Path, text: str, bump_s: int = 0) -> None:
    path.write_text(text)
    if bump_s:
        # Make the change visible even on file systems with coarse mtimes.
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump_s * 1_000_000_000))


def test_good_file_parses_with_defaults(tmp_path: Path) -> None:
    p = tmp_path / "ep.yaml"
    _write(p, GOOD)
    eps = load_endpoints(p)
    assert eps.time_scale == 0.05
    assert eps.names() == ["coder", "planner"]
    planner, coder = eps.llms["planner"], eps.llms["coder"]
    assert planner.served_model == "llama-3.1-8b-instruct" and coder.served_model is None
    assert [r.url for r in planner.replicas] == ["http://127.0.0.1:8001", "http://node2:8000"]
    assert [planner.cap(r) for r in planner.replicas] == [32, 4]
    assert coder.cap(coder.replicas[0]) == DEFAULT_MAX_OUTSTANDING


def test_json_file_parses(tmp_path: Path) -> None:
    p = tmp_path / "ep.json"
    p.write_text(json.dumps({"llms": {"a": {"replicas": ["http://h:1", {"url": "http://h:2"}]}}}, indent=2))
    eps = load_endpoints(p)
    assert [r.url for r in eps.llms["a"].replicas] == ["http://h:1", "http://h:2"]
    assert eps.time_scale is None


def test_unknown_key_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "ep.yaml"
    _write(p, GOOD.replace("    max_outstanding: 32\n", "    max_outstandin: 32\n"))
    with pytest.raises(SpecError) as info:
        load_endpoints(p)
    msg = str(info.value)
    assert f"{p}:5:" in msg
    assert "unknown key 'max_outstandin'" in msg and "max_outstanding" in msg


def test_bad_values_each_named_with_their_line(tmp_path: Path) -> None:
    p = tmp_path / "ep.yaml"
    _write(p, "llms:\n  a:\n    replicas:\n      - node1:8000\n      - {url: http://h:1, max_outstanding: 0}\n"
              "      - http://h:2/v1\n")
    with pytest.raises(SpecError) as info:
        load_endpoints(p)
    problems = info.value.problems
    assert len(problems) == 3
    assert problems[0].startswith(f"{p}:4:") and "http://host:port" in problems[0]
    assert problems[1].startswith(f"{p}:5:") and "greater than or equal to 1" in problems[1]
    assert problems[2].startswith(f"{p}:6:") and "must not end in /v1" in problems[2]


def test_duplicate_replica_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "ep.yaml"
    _write(p, "llms:\n  a:\n    replicas:\n      - http://h:1\n      - http://h:1/\n")
    with pytest.raises(SpecError) as info:
        load_endpoints(p)
    assert f"{p}:5:" in str(info.value) and "duplicate replica 'http://h:1'" in str(info.value)


def test_not_a_mapping(tmp_path: Path) -> None:
    p = tmp_path / "ep.yaml"
    _write(p, "- http://h:1\n")
    with pytest.raises(SpecError) as info:
        load_endpoints(p)
    assert str(info.value).startswith(f"{p}:1: an endpoints file is a mapping")


def test_watcher_reloads_on_change(tmp_path: Path) -> None:
    p = tmp_path / "ep.yaml"
    _write(p, GOOD)
    w = EndpointsWatcher(p, min_interval_s=0.0)
    first = w.load()
    assert w.poll() is first  # unchanged: same object, no re-parse
    _write(p, GOOD.replace("node3", "node4"), bump_s=1)
    second = w.poll()
    assert second is not first and second.llms["coder"].replicas[0].url == "http://node4:8000"
    assert w.reloads == 1


def test_watcher_stats_at_most_every_interval(tmp_path: Path) -> None:
    p = tmp_path / "ep.yaml"
    _write(p, GOOD)
    w = EndpointsWatcher(p, min_interval_s=3600.0)
    first = w.load()
    _write(p, GOOD.replace("node3", "node4"), bump_s=1)
    assert w.poll() is first  # within the interval: the file is not even looked at
    w.min_interval_s = 0.0
    assert w.poll() is not first


def test_bad_reload_keeps_last_good_and_logs_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "ep.yaml"
    _write(p, GOOD)
    w = EndpointsWatcher(p, min_interval_s=0.0)
    good = w.load()
    _write(p, GOOD.replace("    replicas: [http://node3:8000]", "    replica: [http://node3:8000]"), bump_s=1)
    with caplog.at_level(logging.ERROR, logger="scepsy_hpc.gateway"):
        assert w.poll() is good
        assert w.poll() is good
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # logged once per bad version, not on every poll
    assert f"{p}:10:" in errors[0].getMessage() and "unknown key 'replica'" in errors[0].getMessage()
    assert w.last_error is not None
    _write(p, GOOD.replace("node3", "node5"), bump_s=2)
    assert w.poll().llms["coder"].replicas[0].url == "http://node5:8000"
    assert w.last_error is None


def test_missing_file_on_poll_keeps_config(tmp_path: Path) -> None:
    p = tmp_path / "ep.yaml"
    _write(p, GOOD)
    w = EndpointsWatcher(p, min_interval_s=0.0)
    good = w.load()
    p.unlink()
    assert w.poll() is good


def test_load_of_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        EndpointsWatcher(tmp_path / "nope.yaml").load()
    assert "no such file" in str(info.value)


# -- written by `scepsy up` from the agents' reports -------------------------------------------------


def test_another_schema_version_is_refused_naming_the_line(tmp_path: Path) -> None:
    p = tmp_path / "ep.yaml"
    _write(p, "schema_version: 3\n" + GOOD)
    with pytest.raises(SpecError) as err:
        load_endpoints(p)
    assert f"{p}:1: schema_version: 3" in str(err.value) and "re-run `scepsy up`" in str(err.value)


def test_endpoints_from_agents_lists_healthy_replicas_and_round_trips(tmp_path: Path) -> None:
    from scepsy_hpc.backend.records import AgentReport, InstanceReport
    from scepsy_hpc.gateway.endpoints import endpoints_from_agents, write_endpoints

    def inst(llm: str, rep: int, healthy: bool) -> InstanceReport:
        return InstanceReport(llm=llm, replica=rep, gpus=[rep], gpu_frac=1.0, mps_pct=100, url=f"http://n1:{8100 + rep}",
                              healthy=healthy, state="healthy" if healthy else "starting")

    report = AgentReport(node="n1", host="n1", pid=1, state="starting", updated=0.0,
                         instances=[inst("gen", 0, True), inst("gen", 1, False), inst("rr", 2, False)])
    eps = endpoints_from_agents({"n1": report}, 0.05)
    assert {n: [r.url for r in e.replicas] for n, e in eps.llms.items()} == {"gen": ["http://n1:8100"], "rr": []}
    assert eps.llms["gen"].served_model == "gen" and eps.time_scale == 0.05
    p = tmp_path / "endpoints.yaml"
    assert write_endpoints(p, eps) is True
    assert write_endpoints(p, eps) is False   # unchanged: not rewritten, so the gateway does not reload
    assert load_endpoints(p) == eps
    assert p.stat().st_mode & 0o077 == 0
