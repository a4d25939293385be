"""End to end: drivers → gateway → simulated engines; the gateway's trace must show what was driven."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from scepsy_hpc.drive import DriveResult, drive_entrypoint, drive_program, read_inputs
from scepsy_hpc.gateway import start_gateway
from scepsy_hpc.workload.sampler import Call, RequestSampler, Tool
from scepsy_hpc.spec.workflow import Workflow, load_workflow, workflow_from_text
from scepsy_hpc.trace.records import Trace, read_trace

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

INLINE = """name: inline
llms:
  big:   {model: llama-3.2-3b-instruct}
  small: {model: llama-3.2-1b-instruct}
tools:
  lookup: {latency_s: 0.4}
program:
  - {call: big, role: plan, prompt_tokens: {uniform_int: {low: 20, high: 200}}, output_tokens: {uniform_int: {low: 5, high: 30}}}
  - fanout:
      count: {uniform_int: {low: 2, high: 4}}
      body:
        - {call: small, role: search, prompt_tokens: {uniform_int: {low: 50, high: 500}}, output_tokens: {uniform_int: {low: 150, high: 250}}}
  - tool: lookup
  - {call: big, prompt_tokens: 300, output_tokens: {uniform_int: {low: 5, high: 30}}}
"""


async def _through_gateway(tmp_path: Path, wf: Workflow, engines: dict[str, str], time_scale: float,
                           drive) -> tuple[DriveResult, Trace]:
    """Serve `wf`'s LLMs through a fresh gateway with a trace file, run `drive(gateway_url)`, return result and trace."""
    llms = {key: {"served_model": ref.model, "replicas": [engines[ref.model]]} for key, ref in wf.llms.items()}
    endpoints = tmp_path / f"{wf.name}-endpoints.json"
    endpoints.write_text(json.dumps({"time_scale": time_scale, "llms": llms}))
    trace_path = tmp_path / f"{wf.name}.jsonl"
    gw = await start_gateway(endpoints, trace_path)
    try:
        result = await drive(gw.url)
    finally:
        await gw.close()
    return result, read_trace(trace_path)


def _calls_by_request(trace: Trace) -> dict[str | None, list]:
    out: dict[str | None, list] = {}
    for c in trace.calls:
        out.setdefault(c.request, []).append(c)
    return out


def test_drive_program_trace_matches_the_sampled_requests(tmp_path, engines, time_scale):
    wf = workflow_from_text(INLINE)
    n, seed = 4, 7

    async def drive(url: str) -> tuple[DriveResult, DriveResult]:
        by_header = await drive_program(wf, url, n_requests=n, concurrency=2, seed=seed, time_scale=time_scale,
                                        id_style="header", request_prefix="h")
        by_path = await drive_program(wf, url + "/v1", n_requests=n, rate_rps=2.0, seed=seed,
                                      time_scale=time_scale, id_style="path", request_prefix="p")
        return by_header, by_path

    (by_header, by_path), trace = asyncio.run(_through_gateway(tmp_path, wf, engines, time_scale, drive))

    sampler = RequestSampler(wf)
    calls = _calls_by_request(trace)
    assert None not in calls  # every call carried its request id
    assert len(trace.calls) == sum(r.n_calls for res in (by_header, by_path) for r in res.requests.values())
    for prefix, res in (("h", by_header), ("p", by_path)):
        assert res.n_error == 0, res.errors()
        assert res.spans_reported
        for i in range(n):
            rid = f"{prefix}-{i:06d}"
            seq = sampler.sample(random.Random(f"{seed}/request/{i}"))
            expected = Counter((c.llm, c.role, c.prompt_tokens, c.output_tokens) for c in _flat(seq, Call))
            got = Counter((c.llm, c.role, c.prompt_tokens, c.completion_tokens) for c in calls[rid])
            assert got == expected, rid
            assert all(c.status == "ok" and c.t_first is not None for c in calls[rid])
            assert res.requests[rid].n_calls == sum(expected.values())

            req_spans = [s for s in trace.spans if s.request == rid and s.span == "request"]
            tool_spans = [s for s in trace.spans if s.request == rid and s.span == "tool"]
            assert len(req_spans) == 1 and req_spans[0].status == "ok" and req_spans[0].name == "inline"
            assert [s.name for s in tool_spans] == [t.name for t in _flat(seq, Tool)] == ["lookup"]
            # The tool slept 0.4 model seconds; the span adds only the event round trips. At
            # TIME_SCALE 0.02 a model second is 20 ms of wall time, so the bound allows 100 ms of
            # scheduling delay on a loaded 2-core CI machine (20 ms failed there) and still fails a
            # sleep in wall seconds (20 model seconds).
            assert 0.4 <= tool_spans[0].t_end - tool_spans[0].t_start < 0.4 + 5.0
            # Every call and tool lies inside the request span; the tool runs after the fan-out.
            span = req_spans[0]
            assert all(span.t_start <= c.t_start and c.t_end <= span.t_end for c in calls[rid])
            fan = [c for c in calls[rid] if c.llm == "small"]
            assert max(c.t_end for c in fan) <= tool_spans[0].t_start
            # The fan-out's calls ran concurrently: all of them started before the first one ended.
            assert len(fan) >= 2 and max(c.t_start for c in fan) < min(c.t_end for c in fan)


def test_drive_program_against_a_bare_engine_turns_spans_off(engines, time_scale):
    """A bare engine answers 404 for span events: reporting stops silently, the calls still succeed."""
    # The engine serves its catalog name, so the workflow's LLM key must be that name here.
    wf = workflow_from_text("""name: bare
llms: {llama-3.2-1b-instruct: {model: llama-3.2-1b-instruct}}
tools: {t: {latency_s: 0.1}}
program: [{call: llama-3.2-1b-instruct, prompt_tokens: 10, output_tokens: 3}, {tool: t}]
""")
    res = asyncio.run(drive_program(wf, engines["llama-3.2-1b-instruct"], n_requests=3, concurrency=3,
                                    time_scale=time_scale))
    assert res.n_ok == 3 and not res.spans_reported and res.errors() == []


def test_drive_program_records_failed_calls(tmp_path, engines, time_scale):
    """A call the gateway rejects (unknown LLM) fails its request; the request span says so."""
    wf = workflow_from_text("""name: failing
llms: {m: {model: llama-3.2-1b-instruct}, ghost: {model: llama-3.2-1b-instruct}}
program: [{call: m, prompt_tokens: 10, output_tokens: 3}, {call: ghost, prompt_tokens: 10, output_tokens: 3}]
""")
    llms = {"m": {"served_model": "llama-3.2-1b-instruct", "replicas": [engines["llama-3.2-1b-instruct"]]}}
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({"time_scale": time_scale, "llms": llms}))

    async def go() -> DriveResult:
        gw = await start_gateway(endpoints, tmp_path / "t.jsonl")
        try:
            return await drive_program(wf, gw.url, n_requests=2, time_scale=time_scale)
        finally:
            await gw.close()

    res = asyncio.run(go())
    trace = read_trace(tmp_path / "t.jsonl")
    assert res.n_error == 2
    assert all("call 2 to ghost: HTTP 404" in r.errors[0] for r in res.requests.values())
    assert [s.status for s in trace.spans if s.span == "request"] == ["error", "error"]


def _flat(seq: list, kind: type) -> list:
    out = []
    for item in seq:
        if isinstance(item, kind):
            out.append(item)
        elif isinstance(item, list):
            for lane in item:
                out.extend(_flat(lane, kind))
    return out


def _example(name: str) -> tuple[Workflow, Path, list[dict]]:
    d = EXAMPLES / name
    wf = load_workflow(d / "workflow.yaml")
    return wf, d, read_inputs(d / "inputs.jsonl")


def _per_llm(trace: Trace) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for c in trace.calls:
        out.setdefault(c.request, Counter())[c.llm] += 1
    return out


def test_openai_fanout_example_through_the_gateway(tmp_path, engines, time_scale, monkeypatch):
    pytest.importorskip("openai")
    monkeypatch.setenv("SCEPSY_time_scale", str(time_scale))
    wf, d, inputs = _example("openai_fanout")
    n = len(inputs) + 1  # one input is reused: request n-1 gets inputs[0]

    res, trace = asyncio.run(_through_gateway(tmp_path, wf, engines, time_scale, lambda url: drive_entrypoint(
        wf, d, url, n_requests=n, concurrency=3, time_scale=time_scale)))

    assert res.n_error == 0, res.errors()
    assert [c.error for c in trace.calls if c.status != "ok"] == []
    per = _per_llm(trace)
    for i in range(n):
        k = inputs[i % len(inputs)]["subtopics"]
        rid = f"r-{i:06d}"
        assert per[rid] == Counter({"planner": 1, "searcher": k, "writer": 1}), rid
        roles = Counter((c.llm, c.role) for c in trace.calls if c.request == rid)
        assert roles == Counter({("planner", "plan"): 1, ("searcher", "search"): k, ("writer", None): 1})
        # max_tokens is honoured exactly by the simulated engine
        assert {c.completion_tokens for c in trace.calls if c.request == rid and c.llm == "searcher"} == {96}
    assert sorted(s.request for s in trace.spans if s.span == "request") == [f"r-{i:06d}" for i in range(n)]


def test_langgraph_example_through_the_gateway(tmp_path, engines, time_scale):
    pytest.importorskip("langgraph")
    wf, d, inputs = _example("langgraph_agent")
    n = len(inputs)

    res, trace = asyncio.run(_through_gateway(tmp_path, wf, engines, time_scale, lambda url: drive_entrypoint(
        wf, d, url, n_requests=n, concurrency=n, time_scale=time_scale)))

    assert res.n_error == 0, res.errors()
    assert [c.error for c in trace.calls if c.status != "ok"] == []
    per = _per_llm(trace)
    for i, inp in enumerate(inputs):
        r = inp["revisions"]
        rid = f"r-{i:06d}"
        assert per[rid] == Counter({"writer": 1 + r, "critic": 1 + r, "formatter": 1}), rid
        calls = sorted((c for c in trace.calls if c.request == rid), key=lambda c: c.t_start)
        # The graph is sequential: draft, then (critic, revise) r times, critic, formatter.
        assert [(c.llm, c.role) for c in calls] == ([("writer", "draft")] + [("critic", None), ("writer", "revise")] * r
                                                     + [("critic", None), ("formatter", None)])
        assert all(a.t_end <= b.t_start for a, b in zip(calls, calls[1:]))
