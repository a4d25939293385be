"""Endpoints file: parsing with file:line errors, and the watcher's reload rules."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from scepsy_hpc.errors import SpecError
from scepsy_hpc.gateway.endpoints import (DEFAULT_MAX_OUTSTANDING, Endpoints, EndpointsWatcher, LLMEndpoint, Replica,
                                          load_endpoints, merge_endpoints, write_endpoints)

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


def test_watcher_sees_a_same_size_rewrite_within_one_timestamp_tick(tmp_path: Path) -> None:
    # an in-place rewrite keeps the inode; the same size and a restored mtime make it look unchanged to stat()
    # (what an atomic replace onto a reused inode number within one coarse timestamp tick also looks like)
    p = tmp_path / "ep.yaml"
    _write(p, GOOD)
    w = EndpointsWatcher(p, min_interval_s=0.0)
    first = w.load()
    assert first.llms["coder"].replicas[0].url == "http://node3:8000"
    st = os.stat(p)
    with open(p, "r+") as f:
        f.write(GOOD.replace("node3", "node4"))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(p)
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (st.st_mtime_ns, st.st_size, st.st_ino)
    assert w.poll().llms["coder"].replicas[0].url == "http://node4:8000"


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
    from scepsy_hpc.gateway.endpoints import endpoints_from_agents

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


# -- aliases, and one file for several deployments ----------------------------------------------------


def test_aliases_are_accepted_names_of_their_llm(tmp_path: Path) -> None:
    p = tmp_path / "ep.yaml"
    _write(p, "llms:\n  dep/planner:\n    aliases: [planner, plan]\n    replicas: [http://h:1]\n"
              "  dep/coder:\n    replicas: [http://h:2]\n")
    eps = load_endpoints(p)
    assert eps.names() == ["dep/coder", "dep/planner"]  # the keys: one per pool
    assert eps.accepted_names() == {"dep/coder": "dep/coder", "dep/planner": "dep/planner", "plan": "dep/planner",
                                    "planner": "dep/planner"}


def test_alias_conflicts_name_both_uses_with_their_lines(tmp_path: Path) -> None:
    p = tmp_path / "ep.yaml"
    _write(p, "llms:\n"
              "  planner:\n"
              "    aliases:\n"
              "      - plan\n"
              "      - coder\n"             # line 5: another LLM's key (line 7)
              "    replicas: [http://h:1]\n"
              "  coder:\n"
              "    aliases:\n"
              "      - plan\n"              # line 9: another LLM's alias (line 4)
              "      - coder\n"             # line 10: its own key
              "      - ''\n"                # line 11
              "    replicas: [http://h:2]\n")
    with pytest.raises(SpecError) as info:
        load_endpoints(p)
    assert info.value.problems == [
        f"{p}:5: llms.planner.aliases[1]: alias 'coder' is also the key of llms.coder (line 7); "
        "a name stands for one LLM, so rename or remove the alias",
        f"{p}:9: llms.coder.aliases[0]: alias 'plan' is also llms.planner.aliases[0] (line 4); "
        "a name stands for one LLM, so keep one",
        f"{p}:10: llms.coder.aliases[1]: alias 'coder' is the LLM's own key; remove it",
        f"{p}:11: llms.coder.aliases[2]: an alias must not be empty",
    ]


def _deployment(*llms: str, aliases: dict[str, list[str]] | None = None,
                served: dict[str, str] | None = None) -> Endpoints:
    aliases, served = aliases or {}, served or {}
    return Endpoints(llms={n: LLMEndpoint(served_model=served.get(n), aliases=aliases.get(n, []),
                                          replicas=[Replica(url=f"http://{n}:1")]) for n in llms})


def test_merge_keys_each_llm_by_deployment_with_bare_names_only_when_unique() -> None:
    merged = merge_endpoints({
        "rag": _deployment("retriever", "planner", aliases={"planner": ["plan", "boss"]}, served={"planner": "llama"}),
        "agent": _deployment("planner", "coder", aliases={"coder": ["boss"]}),
    }, 0.5)
    assert list(merged.llms) == ["agent/coder", "agent/planner", "rag/planner", "rag/retriever"]
    assert {k: v.aliases for k, v in merged.llms.items()} == {
        "agent/coder": ["agent/boss", "coder"],   # 'boss' is an alias in both deployments: scoped only
        "agent/planner": [],                       # 'planner' is an LLM of both: no bare alias
        "rag/planner": ["plan", "rag/boss", "rag/plan"],
        "rag/retriever": ["retriever"],
    }
    assert merged.llms["rag/planner"].served_model == "llama"
    assert merged.llms["agent/planner"].served_model == "planner"  # the engines still serve the bare name
    assert merged.llms["rag/retriever"].replicas == [Replica(url="http://retriever:1")]
    assert merged.time_scale == 0.5
    names = merged.accepted_names()
    assert "planner" not in names and names["plan"] == names["rag/plan"] == "rag/planner"
    again = merge_endpoints({"agent": _deployment("planner", "coder", aliases={"coder": ["boss"]}),
                             "rag": _deployment("retriever", "planner", aliases={"planner": ["plan", "boss"]},
                                                served={"planner": "llama"})}, 0.5)
    assert again == merged and list(again.llms) == list(merged.llms)  # input order does not matter


def test_merge_never_lets_a_bare_name_shadow_a_key() -> None:
    # LLM 'b/x' of deployment 'a' is keyed 'a/b/x'; the bare 'b/x' would be unique, but deployment 'b'
    # has LLM 'x' keyed 'b/x' already.
    merged = merge_endpoints({"a": _deployment("b/x"), "b": _deployment("x")}, None)
    assert merged.accepted_names() == {"a/b/x": "a/b/x", "b/x": "b/x", "x": "b/x"}
    assert merged.time_scale is None


def test_merge_refuses_deployment_names_with_a_slash() -> None:
    with pytest.raises(SpecError) as info:
        merge_endpoints({"a/b": _deployment("x")}, None)
    assert "deployment name 'a/b'" in str(info.value) and "no '/'" in str(info.value)


def test_merged_endpoints_round_trip_through_the_file(tmp_path: Path) -> None:
    merged = merge_endpoints({"rag": _deployment("planner", aliases={"planner": ["plan"]}),
                              "agent": _deployment("planner")}, 1.0)
    p = tmp_path / "endpoints.yaml"
    assert write_endpoints(p, merged) is True
    text = p.read_text()
    assert load_endpoints(p) == merged
    assert "aliases: []" not in text and "aliases:" in text  # empty lists are left out of the file


def test_endpoints_without_aliases_are_written_as_before(tmp_path: Path) -> None:
    p = tmp_path / "endpoints.yaml"
    write_endpoints(p, _deployment("gen"))
    assert p.read_text() == ("llms:\n  gen:\n    max_outstanding: 256\n    replicas:\n    - url: http://gen:1\n"
                             "schema_version: 1\n")
