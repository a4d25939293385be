"""Trace records, request graphs and their aggregation, on hand-computed traces."""

from __future__ import annotations

import math

import pytest

from scepsy_hpc.errors import SpecError
from scepsy_hpc.workload.sampler import Call, Tool
from scepsy_hpc.trace.graph import from_sample, from_trace
from scepsy_hpc.trace.records import CallRecord, SpanRecord, Trace, read_trace, write_trace
from scepsy_hpc.trace.stats import aggregate, call_mix


def call(req, llm, t0, t1, role=None, p=100, o=10, status="ok"):
    return CallRecord(request=req, llm=llm, t_start=t0, t_end=t1, role=role, prompt_tokens=p,
                      completion_tokens=o, status=status)


def test_round_trip(tmp_path):
    tr = Trace({"workflow": "w", "time_scale": 0.1},
               (call("r1", "a", 0.0, 1.0, role="plan"), call("r1", "b", 1.0, 2.5)),
               (SpanRecord("request", "r1", 0.0, 3.0), SpanRecord("tool", "r1", 2.5, 3.0, name="search")))
    p = tmp_path / "t.jsonl"
    write_trace(p, tr)
    back = read_trace(p)
    assert back.calls == tr.calls
    assert back.spans == tr.spans
    assert back.meta["workflow"] == "w" and back.meta["version"] == 1


@pytest.mark.parametrize("line, needle", [
    ('{"kind": "call", "llm": "a", "t_start": 0}', "lacks t_end"),
    ('{"kind": "call", "llm": "a", "t_start": 0, "t_end": 1, "tokens": 3}', "unknown field(s) tokens"),
    ('{"kind": "cal", "llm": "a"}', "unknown record kind 'cal'"),
    ('{"kind": "call", "llm": "a", "t_start": 2, "t_end": 1}', "before t_start"),
    ('{"kind": "call", "llm": "a", "t_start": 0, "t_end": 1, "status": "bad"}', "status 'bad'"),
    ('not json', "not JSON"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"kind": "call", "llm": "a", "t_start": 0, "t_end": 1}\n\n' + line + "\n")
    with pytest.raises(SpecError) as e:
        read_trace(p)
    assert f"{p}:3:" in str(e.value)
    assert needle in str(e.value)


def test_n_and_p_hand_computed():
    # r1: a runs 0-2, then three b calls in parallel 2-4, 2-5, 2-3, then a 5-6.
    # r2: a 0-1, b 1-2, b 2-3 (sequential).
    calls = [call("r1", "a", 0, 2), call("r1", "b", 2, 4), call("r1", "b", 2, 5), call("r1", "b", 2, 3),
             call("r1", "a", 5, 6),
             call("r2", "a", 0, 1), call("r2", "b", 1, 2), call("r2", "b", 2, 3)]
    st = aggregate(from_trace(Trace({}, tuple(calls), ())))
    a, b = st.per_llm["a"], st.per_llm["b"]
    assert st.requests == 2
    assert a.n == pytest.approx(1.5) and b.n == pytest.approx(2.5)
    # b: busy (2+3+1) + (1+1) = 8 s; active: 3 s (2-5) + 2 s = 5 s.
    assert b.p == pytest.approx(8 / 5)
    assert a.p == pytest.approx(1.0)
    # shares: r1 a 3/9, r2 a 1/3 -> mean 1/3, CV 0
    assert a.share_mean == pytest.approx(1 / 3) and a.share_cv == pytest.approx(0.0, abs=1e-12)
    # critical path of r1: a(0-2) -> b(2-5) -> a(5-6); of r2: a -> b -> b.
    assert a.cp_time_mean_s == pytest.approx((3 + 1) / 2)
    assert b.cp_time_mean_s == pytest.approx((3 + 2) / 2)
    assert st.latency_mean_s == pytest.approx((6 + 3) / 2)


def test_inferred_graph_keeps_gaps_and_request_span():
    calls = (call("r", "a", 1.0, 2.0), call("r", "b", 2.5, 3.5), call("r", "b", 2.6, 4.0))
    spans = (SpanRecord("request", "r", 0.0, 5.0), SpanRecord("tool", "r", 4.0, 4.5, name="search"))
    (g,) = from_trace(Trace({}, calls, spans))
    assert g.latency() == pytest.approx(5.0)  # gaps and tail reproduce the observed span
    assert g.latency_s == pytest.approx(5.0)
    kinds = [(n.kind, n.name, n.deps) for n in g.nodes]
    assert kinds[0] == ("call", "a", ())
    assert kinds[1][2] == (0,) and kinds[2][2] == (0,)  # both b calls follow a: a fan-out
    assert kinds[3] == ("tool", "search", (2,))  # the tool follows the b call that ended last
    # doubling every call doubles call time on the critical path only: 5 + 1 + 1.4
    assert g.latency(lambda n: 2 * n.duration_s if n.kind == "call" else n.duration_s) == pytest.approx(7.4)
    st = aggregate([g])
    assert st.tool_cp_mean_s == pytest.approx(0.5)
    assert st.gap_cp_mean_s == pytest.approx(1.0 + 0.6 + 0.0 + 0.5)


def test_failed_requests_are_left_out_and_counted():
    calls = (call("r1", "a", 0, 1), call("r2", "a", 0, 1, status="error"))
    st = aggregate(from_trace(Trace({}, calls, ())))
    assert st.requests == 1 and st.failed == 1
    assert call_mix(from_trace(Trace({}, calls, ()))) == {"a": [(100, 10)]}


def test_graph_from_sample_is_exact_structure():
    seq = [Call("a", None, 10, 5), [[Call("b", None, 1, 1), Tool("t", 2.0)], [Call("c", None, 1, 1)]],
           Call("a", "final", 10, 5)]
    g = from_sample("s", seq, lambda c: {"a": 1.0, "b": 0.5, "c": 3.0}[c.llm])
    # a(1) + max(b 0.5 + tool 2, c 3) + a(1)
    assert g.latency() == pytest.approx(5.0)
    last = g.nodes[-1]
    assert len(last.deps) == 2  # joins both lanes
    st = aggregate([g])
    assert st.per_llm["a"].roles["final"].calls_per_request == 1
    assert math.isclose(st.per_llm["c"].cp_share, 3 / 5)


def test_call_patterns_keep_offsets_per_request():
    from scepsy_hpc.trace.stats import call_patterns

    calls = (call("r1", "a", 1.0, 2.0, p=10, o=1), call("r1", "a", 1.0, 3.0, p=20, o=2), call("r1", "a", 4.0, 5.0, p=30, o=3),
             call("r1", "b", 2.0, 3.0), call("r2", "b", 0.0, 1.0))
    pats = call_patterns(from_trace(Trace({}, calls, ())))
    assert pats["a"] == [[(0.0, 10, 1), (0.0, 20, 2), (3.0, 30, 3)]]
    assert len(pats["b"]) == 2 and all(p[0][0] == 0.0 for p in pats["b"])
