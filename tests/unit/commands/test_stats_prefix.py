"""`scepsy stats` shows the gateway's prompt-reuse accounting (own prefix / shared system share per LLM and
role, from trace.stats.prefix_shares) and counts tool spans; figures computed by hand from a small trace."""

from __future__ import annotations

import json

from scepsy_hpc.cli import main

# Request r1: two planner calls of "agent" (own 0 and 96/200 = 0.48; system 40/100 = 0.4 and 48/200 = 0.24),
# one "judge" call without the counts (an older gateway). Request r2: a planner call without a request prefix
# (None counts as 0; system 80/160 = 0.5) and a writer call (320/400 = 0.8; system 0). Left out: a writer call
# without system_tokens and a failed call. Means: planner own 0.16, sys 0.38; writer 0.8, 0; all 0.32, 0.285.
LINES = [
    {"kind": "meta", "version": 1, "workflow": "react"},
    {"kind": "span", "span": "request", "request": "r1", "t_start": 0.0, "t_end": 10.0},
    {"kind": "call", "request": "r1", "llm": "agent", "role": "planner", "t_start": 0.0, "t_end": 1.0,
     "prompt_tokens": 100, "completion_tokens": 10, "prefix_tokens": 0, "system_tokens": 40},
    {"kind": "span", "span": "tool", "request": "r1", "name": "search", "t_start": 1.0, "t_end": 2.0},
    {"kind": "call", "request": "r1", "llm": "agent", "role": "planner", "t_start": 2.0, "t_end": 3.0,
     "prompt_tokens": 200, "completion_tokens": 10, "prefix_tokens": 96, "system_tokens": 48},
    {"kind": "call", "request": "r1", "llm": "judge", "t_start": 3.0, "t_end": 4.0, "prompt_tokens": 300,
     "completion_tokens": 5},
    {"kind": "span", "span": "request", "request": "r2", "t_start": 0.0, "t_end": 10.0},
    {"kind": "call", "request": "r2", "llm": "agent", "role": "planner", "t_start": 0.0, "t_end": 1.0,
     "prompt_tokens": 160, "completion_tokens": 10, "system_tokens": 80},
    {"kind": "span", "span": "tool", "request": "r2", "name": "search", "t_start": 1.0, "t_end": 2.0},
    {"kind": "span", "span": "tool", "request": "r2", "name": "fetch", "t_start": 1.0, "t_end": 2.5},
    {"kind": "call", "request": "r2", "llm": "agent", "role": "writer", "t_start": 3.0, "t_end": 4.0,
     "prompt_tokens": 400, "completion_tokens": 10, "prefix_tokens": 320, "system_tokens": 0},
    {"kind": "call", "request": "r2", "llm": "agent", "role": "writer", "t_start": 4.0, "t_end": 5.0,
     "prompt_tokens": 50, "completion_tokens": 10, "prefix_tokens": 48},
    {"kind": "call", "request": None, "llm": "agent", "role": "writer", "t_start": 5.0, "t_end": 6.0,
     "prompt_tokens": 100, "status": "error", "error": "boom", "prefix_tokens": 100, "system_tokens": 100},
]


def _write(tmp_path, lines):
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps({k: v for k, v in d.items() if v is not None}) + "\n" for d in lines))
    return p


def test_stats_json_has_prefix_shares_and_tool_spans(tmp_path, capsys):
    assert main(["stats", str(_write(tmp_path, LINES)), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    pre = d["per_llm"]["agent"]["prefix"]
    assert set(pre) == {"planner", "writer", "*"}
    assert pre["planner"]["calls"] == 3 and pre["writer"]["calls"] == 1 and pre["*"]["calls"] == 4
    for role, own, sys_ in (("planner", 0.16, 0.38), ("writer", 0.8, 0.0), ("*", 0.32, 0.285)):
        assert abs(pre[role]["prefix_share_mean"] - own) < 1e-9, role
        assert abs(pre[role]["system_share_mean"] - sys_) < 1e-9, role
    assert "prefix" not in d["per_llm"]["judge"]  # no counts in its records
    assert d["tool_spans"] == 3 and d["tool_spans_by_name"] == {"fetch": 1, "search": 2}


def test_stats_table_has_prefix_columns_and_tool_spans(tmp_path, capsys):
    assert main(["stats", str(_write(tmp_path, LINES))]) == 0
    out = capsys.readouterr().out
    reuse = out[out.index("prompt reuse"):]
    assert "own prefix" in reuse and "shared sys" in reuse
    rows = [line.replace("│", " ").split() for line in reuse.splitlines() if line.startswith("│")]
    assert rows == [["agent", "4", "32.0%", "28.5%"], ["planner", "3", "16.0%", "38.0%"],
                        ["writer", "1", "80.0%", "0.0%"]]  # judge has no counts: no row
    assert "tool spans: 3 (fetch 1, search 2)" in out


def test_stats_of_an_older_trace_without_counts(tmp_path, capsys):
    old = [{k: v for k, v in d.items() if k not in ("prefix_tokens", "system_tokens")} for d in LINES
           if d.get("span") != "tool"]
    p = _write(tmp_path, old)
    assert main(["stats", str(p)]) == 0
    out = capsys.readouterr().out
    assert "own prefix" not in out and "tool spans: 0" in out
    assert main(["stats", str(p), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert all("prefix" not in s for s in d["per_llm"].values())
    assert d["tool_spans"] == 0 and d["tool_spans_by_name"] == {}
