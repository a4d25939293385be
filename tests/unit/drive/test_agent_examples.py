"""End to end: the agent examples (ReAct on LangChain, structured output, the OpenAI Agents SDK) driven through
the gateway against simulated engines that answer tools with tool calls and honour response_format."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from scepsy_hpc.drive import DriveResult, drive_entrypoint, load_entrypoint, read_inputs
from scepsy_hpc.engine.supervisor import free_ports, start, stop_all, wait_healthy
from scepsy_hpc.gateway import start_gateway
from scepsy_hpc.spec.workflow import Workflow, load_workflow
from scepsy_hpc.trace.records import Trace, read_trace

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
MODELS = ("llama-3.2-1b-instruct", "llama-3.2-3b-instruct", "qwen2.5-1.5b-instruct")
# Every first step of an agent is answered with tool calls (rate 1); the rate halves with each round of tool
# results already in the conversation, so the loops still end (on average after 2 rounds).
TOOL_RATE = 1.0


@pytest.fixture(scope="module")
def agent_engines(tmp_path_factory, time_scale) -> dict[str, str]:
    """Served model name -> base URL of a sim engine that always answers a first tool step with tool calls."""
    logs = tmp_path_factory.mktemp("agent-engine-logs")
    procs = []
    try:
        urls = {}
        for model, port in zip(MODELS, free_ports(len(MODELS))):
            url = f"http://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "scepsy_hpc.engine.sim_server", "--model", model, "--gpu", "h100-sxm",
                    "--host", "127.0.0.1", "--port", str(port), "--time-scale", repr(time_scale),
                    "--tool-call-rate", repr(TOOL_RATE)]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            procs.append(start(argv, logs / f"{model}.log", what=f"sim engine {model}", health=url, env=env))
            urls[model] = url
        wait_healthy(procs, 30.0)
        yield urls
    finally:
        stop_all(procs)


def _example(name: str) -> tuple[Workflow, Path, list[dict]]:
    d = EXAMPLES / name
    wf = load_workflow(d / "workflow.yaml")
    return wf, d, read_inputs(d / "inputs.jsonl")


def _recording(monkeypatch, wf: Workflow, d: Path) -> dict[str, object]:
    """Wrap the example's entrypoint so that each request's return value is kept, keyed by its request id
    (the `/r/<id>/v1` of its base URL); drive_entrypoint then imports the same module and gets the wrapper."""
    mod_name, fn_name = wf.driver.entrypoint.split(":")
    fn = load_entrypoint(wf.driver.entrypoint, d)
    module = sys.modules[mod_name]
    out: dict[str, object] = {}

    def rid(base_url: str) -> str:
        return base_url.rstrip("/").split("/")[-2]

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(input, base_url):
            out[rid(base_url)] = res = await fn(input, base_url)
            return res
    else:
        @functools.wraps(fn)
        def wrapper(input, base_url):
            out[rid(base_url)] = res = fn(input, base_url)
            return res
    monkeypatch.setattr(module, fn_name, wrapper)
    return out


def _drive(tmp_path: Path, wf: Workflow, d: Path, engines: dict[str, str], time_scale: float,
           n: int) -> tuple[DriveResult, Trace]:
    """Serve `wf`'s LLMs through a fresh gateway with a trace file and drive the example's code n times."""
    llms = {key: {"served_model": ref.model, "replicas": [engines[ref.model]]} for key, ref in wf.llms.items()}
    endpoints = tmp_path / f"{wf.name}-endpoints.json"
    endpoints.write_text(json.dumps({"time_scale": time_scale, "llms": llms}))
    trace_path = tmp_path / f"{wf.name}.jsonl"

    async def go() -> DriveResult:
        gw = await start_gateway(endpoints, trace_path)
        try:
            return await drive_entrypoint(wf, d, gw.url, n_requests=n, concurrency=n, time_scale=time_scale)
        finally:
            await gw.close()

    res = asyncio.run(go())
    return res, read_trace(trace_path)


def _calls(trace: Trace, rid: str) -> list:
    return sorted((c for c in trace.calls if c.request == rid), key=lambda c: c.t_start)


def _tool_spans(trace: Trace) -> dict[str, list]:
    """Request id -> its tool spans, in time order: what the gateway infers from tool calls and their results."""
    out: dict[str, list] = {}
    for s in sorted(trace.spans, key=lambda s: s.t_start):
        if s.span == "tool":
            out.setdefault(s.request, []).append(s)
    return out


def _check_tool_loop(res: DriveResult, trace: Trace, returned: dict, n: int, llm: str) -> None:
    """Every request succeeded, made one call more than it had tool rounds, and ran tools."""
    assert res.n_error == 0, res.errors()
    assert [c.error for c in trace.calls if c.status != "ok"] == []
    assert sorted(returned) == [f"r-{i:06d}" for i in range(n)]
    for rid, out in returned.items():
        calls = _calls(trace, rid)
        assert {c.llm for c in calls} == {llm}, rid
        assert out["tool_calls"], f"{rid}: the first step is always answered with tool calls (rate 1): {out}"
        # A tool round is one call answered with tool calls, then the next call carries the results: so at
        # least two calls, and the calls never overlap (the loop is sequential).
        assert len(calls) >= 2, rid
        assert all(a.t_end <= b.t_start for a, b in zip(calls, calls[1:])), rid
        assert all(isinstance(c.get("output", c.get("result")), str) for c in out["tool_calls"]), out


def _check_tool_spans(trace: Trace, returned: dict, names: set[str]) -> None:
    spans = _tool_spans(trace)
    for rid, out in returned.items():
        calls = _calls(trace, rid)
        got = spans.get(rid, [])
        assert Counter(s.name for s in got) == Counter(c["name"] for c in out["tool_calls"]), rid
        assert {s.name for s in got} <= names
        # each tool span lies between the call that asked for it and the call that carried its result
        for s in got:
            assert any(a.t_end <= s.t_start and s.t_end <= b.t_start for a, b in zip(calls, calls[1:])), (rid, s)


# --- ReAct (LangChain create_agent) --------------------------------------------------------------------------

REACT_TOOLS = {"calculator", "convert_units", "search"}


def _run_react(tmp_path, agent_engines, time_scale, monkeypatch):
    pytest.importorskip("langchain_openai")
    pytest.importorskip("langchain.agents")
    wf, d, inputs = _example("react_agent")
    returned = _recording(monkeypatch, wf, d)
    res, trace = _drive(tmp_path, wf, d, agent_engines, time_scale, len(inputs))
    return res, trace, returned, len(inputs)


def test_react_agent_example_through_the_gateway(tmp_path, agent_engines, time_scale, monkeypatch):
    res, trace, returned, n = _run_react(tmp_path, agent_engines, time_scale, monkeypatch)
    _check_tool_loop(res, trace, returned, n, "agent")
    for rid, out in returned.items():
        assert {c["name"] for c in out["tool_calls"]} <= REACT_TOOLS
        # one model call per AIMessage: the trace saw exactly the calls the agent made
        assert out["llm_calls"] == len(_calls(trace, rid)), rid


def test_react_agent_trace_shows_tool_spans(tmp_path, agent_engines, time_scale, monkeypatch):
    res, trace, returned, _ = _run_react(tmp_path, agent_engines, time_scale, monkeypatch)
    assert res.n_error == 0, res.errors()
    _check_tool_spans(trace, returned, REACT_TOOLS)


# --- structured output -----------------------------------------------------------------------------------------


def test_structured_agent_example_parses_every_answer(tmp_path, agent_engines, time_scale, monkeypatch):
    pytest.importorskip("openai")
    wf, d, inputs = _example("structured_agent")
    returned = _recording(monkeypatch, wf, d)
    n = len(inputs)
    res, trace = _drive(tmp_path, wf, d, agent_engines, time_scale, n)

    assert res.n_error == 0, res.errors()
    assert [c.error for c in trace.calls if c.status != "ok"] == []
    agent = sys.modules["agent"]
    for i, inp in enumerate(inputs):
        rid = f"r-{i:06d}"
        out = returned[rid]
        assert isinstance(out["plan"], agent.Plan) and isinstance(out["review"], agent.Review)
        assert all(isinstance(r, agent.StepResult) for r in out["results"])
        k = len(out["results"])
        assert 1 <= k <= min(inp["max_steps"], len(out["plan"].steps))
        # every call's answer was parsed: one parsed object per call the gateway saw
        calls = _calls(trace, rid)
        assert Counter(c.llm for c in calls) == Counter({"planner": 1, "worker": k, "reviewer": 1}), rid
        assert 1 + k + 1 == len(calls)
        # plan, then the workers (in parallel), then the review
        assert calls[0].llm == "planner" and calls[-1].llm == "reviewer"
        assert all(calls[0].t_end <= c.t_start and c.t_end <= calls[-1].t_start for c in calls[1:-1])


# --- OpenAI Agents SDK -----------------------------------------------------------------------------------------

SDK_TOOLS = {"get_weather", "convert_currency", "days_until"}


def _run_sdk(tmp_path, agent_engines, time_scale, monkeypatch):
    pytest.importorskip("agents")
    wf, d, inputs = _example("openai_agents_sdk")
    returned = _recording(monkeypatch, wf, d)
    res, trace = _drive(tmp_path, wf, d, agent_engines, time_scale, len(inputs))
    return res, trace, returned, len(inputs)


def test_openai_agents_sdk_example_through_the_gateway(tmp_path, agent_engines, time_scale, monkeypatch):
    res, trace, returned, n = _run_sdk(tmp_path, agent_engines, time_scale, monkeypatch)
    _check_tool_loop(res, trace, returned, n, "assistant")
    for out in returned.values():
        assert {c["name"] for c in out["tool_calls"]} <= SDK_TOOLS
        assert all(json.loads(c["arguments"]) for c in out["tool_calls"])  # schema-valid JSON objects


def test_openai_agents_sdk_trace_shows_tool_spans(tmp_path, agent_engines, time_scale, monkeypatch):
    res, trace, returned, _ = _run_sdk(tmp_path, agent_engines, time_scale, monkeypatch)
    assert res.n_error == 0, res.errors()
    _check_tool_spans(trace, returned, SDK_TOOLS)
