"""trace → stats → profile → predict as a user runs them (real subprocesses, real HTTP)."""

from __future__ import annotations

from pathlib import Path

import json
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parents[3]


def scepsy(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sim_trace(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "dr.jsonl"
    out = scepsy("simulate", "deep_research", "--plan", "deep_research", "--rate", "0.6", "--requests", "150",
                 "--trace", str(p))
    assert out.returncode == 0, out.stderr
    return p


def test_stats_of_a_simulated_trace(sim_trace):
    out = scepsy("stats", str(sim_trace), "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["requests"] == 150 and d["failed"] == 0
    s = d["per_llm"]["searcher"]
    assert 10 < s["n"] < 25 and s["p"] > 1.5  # a 3-8 wide fan-out, looped ~2 times
    assert d["per_llm"]["writer"]["p"] == pytest.approx(1.0)
    assert set(d["per_llm"]["planner"]["roles"]) == {"plan", "revise"}
    assert sum(v["share_mean"] for v in d["per_llm"].values()) == pytest.approx(1.0, abs=0.02)
    human = scepsy("stats", str(sim_trace))
    assert "share stability" in human.stdout and "searcher" in human.stdout


def test_predict_json_keys_both_predictors_and_saturation(sim_trace):
    got = {}
    for pred in ("alp-cp", "alp-paper"):
        out = scepsy("predict", "deep_research", "--plan", "deep_research", "--rate", "0.5", "--predictor", pred,
                     "--samples", "200", "--json")
        assert out.returncode == 0, out.stderr
        d = json.loads(out.stdout)
        assert {"latency_s", "throughput_rps", "bottleneck_llm", "predictor"} <= set(d)
        assert d["predictor"] == pred and d["latency_s"] > 0 and d["saturated"] is False
        got[pred] = d
    assert got["alp-cp"]["throughput_rps"] == pytest.approx(got["alp-paper"]["throughput_rps"])
    over = json.loads(scepsy("predict", "deep_research", "--plan", "deep_research", "--rate", "50", "--samples", "200",
                             "--json").stdout)
    assert over["saturated"] is True and over["latency_s"] is None
    traced = json.loads(scepsy("predict", "deep_research", "--plan", "deep_research", "--rate", "0.5", "--trace",
                               str(sim_trace), "--json").stdout)
    assert traced["workload"].startswith("trace ") and traced["bottleneck_llm"] in ("planner", "searcher", "writer")


def test_predict_rejects_a_trace_of_another_workflow(sim_trace):
    out = scepsy("predict", "rag_rerank", "--plan", "rag_rerank", "--rate", "1", "--trace", str(sim_trace))
    assert out.returncode == 2
    assert "does not define" in out.stderr and "Traceback" not in out.stderr


def test_profile_synthetic_resumes_and_feeds_predict(tmp_path):
    d = tmp_path / "prof"
    args = ("profile", "rag_rerank", "--tp", "1,2,4", "--gpu-frac", "0.5,1", "-o", str(d), "--calls", "400", "--json")
    first = json.loads(scepsy(*args).stdout)
    assert {(p["llm"], p["tp"], p["gpu_frac"]) for p in first["profiled"]} >= {("rewriter", 1, 0.5), ("generator", 4, 1.0)}
    assert any("does not fit" in s["why"] for s in first["skipped"])  # a 70B model on one GPU
    again = json.loads(scepsy(*args).stdout)
    assert again["profiled"] == [] and all("already profiled" in s["why"] or "does not fit" in s["why"]
                                           for s in again["skipped"])
    out = scepsy("predict", "rag_rerank", "--plan", "rag_rerank", "--rate", "2", "--profiles", str(d), "--json")
    assert out.returncode == 0, out.stderr
    pr = json.loads(out.stdout)
    assert all(v["source"] == "synthetic" for v in pr["profile_provenance"].values())
    missing = scepsy("predict", "beam_search", "--plan", "beam_search", "--rate", "0.2", "--profiles", str(d))
    assert missing.returncode == 2 and "no profile of LLM" in missing.stderr


def test_profile_local_engine_over_http_agrees_with_the_model(tmp_path):
    syn = json.loads(scepsy("profile", "rag_rerank", "--llms", "rewriter", "--tp", "1", "--gpu-frac", "1",
                            "-o", str(tmp_path / "s"), "--json").stdout)
    out = scepsy("profile", "rag_rerank", "--llms", "rewriter", "--tp", "1", "--gpu-frac", "1", "--backend", "local",
                 "--calls", "120", "--fractions", "0.6", "--start-frac", "0.4", "-o", str(tmp_path / "l"), "--json")
    assert out.returncode == 0, out.stderr
    loc = json.loads(out.stdout)
    (p,) = loc["profiled"]
    assert p["source"] == "measured"
    table = json.loads(open(p["path"]).read())
    assert table["engine"] == "scepsy-sim" and table["workload"]["time_scale"] > 0
    from scepsy_hpc.profile.table import load_profile

    http_t, syn_t = load_profile(p["path"]), load_profile(syn["profiled"][0]["path"])
    # the same model paced in real time over HTTP: latency agrees where the short runs can judge it
    # (capacity needs runs several batches long, which a unit test cannot afford)
    judged = [q for q in http_t.points if not q.saturated and q.rate_rps < 0.6 * syn_t.capacity_rps]
    assert judged
    for q in judged:
        assert q.latency_mean_s == pytest.approx(syn_t.latency_at(q.rate_rps), rel=0.35), q.rate_rps


def test_trace_command_runs_the_openai_example_through_the_gateway(tmp_path):
    t = tmp_path / "oa.jsonl"
    out = scepsy("trace", str(ROOT / "examples" / "openai_fanout" / "workflow.yaml"), "--requests", "3", "--time-scale", "0.02",
                 "-o", str(t))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in t.read_text().splitlines()]
    calls = [x for x in lines if x["kind"] == "call"]
    reqs = {c["request"] for c in calls}
    assert len(reqs) == 3 and all(c["status"] == "ok" for c in calls)
    assert {c["llm"] for c in calls} == {"planner", "searcher", "writer"}
    assert any(x["kind"] == "span" and x["span"] == "request" for x in lines)
    st = json.loads(scepsy("stats", str(t), "--json").stdout)
    assert st["per_llm"]["planner"]["n"] == pytest.approx(1.0) and st["per_llm"]["writer"]["n"] == pytest.approx(1.0)


@pytest.mark.parametrize("rate", [1.0, 0.0])
def test_trace_command_starts_engines_at_the_workflows_tool_call_rate(tmp_path, rate):
    # the react agent's engines answer tools with tool calls at the spec's rate: always (every request's trace
    # has tool spans, inferred by the gateway), or never (none); the default 0.5 would give some of each
    import shutil

    src = tmp_path / "react_agent"
    shutil.copytree(ROOT / "examples" / "react_agent", src)
    wf = src / "workflow.yaml"
    wf.write_text(wf.read_text().replace("agent: {model: llama-3.2-3b-instruct}",
                                         f"agent: {{model: llama-3.2-3b-instruct, tool_call_rate: {rate}}}"))
    t = tmp_path / "react.jsonl"
    out = scepsy("trace", str(wf), "--driver", "entrypoint", "--requests", "4", "--time-scale", "0.02", "-o", str(t))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in t.read_text().splitlines()]
    with_tools = {x["request"] for x in lines if x["kind"] == "span" and x["span"] == "tool"}
    requests = {x["request"] for x in lines if x["kind"] == "call"}
    assert len(requests) == 4
    assert with_tools == (requests if rate == 1.0 else set())
