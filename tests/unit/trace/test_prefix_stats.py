"""Prefix shares per LLM and role from call records; old traces (without the fields) still load."""

from __future__ import annotations

import math
from pathlib import Path

from scepsy_hpc.trace.records import CallRecord, read_trace
from scepsy_hpc.trace.stats import prefix_shares


def _call(llm: str, role: str | None, prompt: int | None, prefix: int | None, system: int | None,
          status: str = "ok") -> CallRecord:
    return CallRecord(request="r", llm=llm, role=role, t_start=0.0, t_end=1.0, prompt_tokens=prompt,
                      prefix_tokens=prefix, system_tokens=system, status=status)


def test_mean_shares_per_llm_and_role() -> None:
    calls = [_call("a", "plan", 100, 0, 50), _call("a", "plan", 200, 150, 50), _call("a", "act", 100, 80, 20),
             _call("a", None, 100, None, 10),     # no request: prefix counts as 0
             _call("a", "act", 100, 100, 100, status="error"), _call("a", "act", None, 1, 1),
             _call("b", None, 10, None, None)]    # not measured (an old trace)
    s = prefix_shares(calls)
    assert set(s) == {"a"}
    plan = s["a"]["plan"]
    assert plan.calls == 2 and math.isclose(plan.prefix_share_mean, (0 + 0.75) / 2)
    assert math.isclose(plan.system_share_mean, (0.5 + 0.25) / 2)
    every = s["a"]["*"]
    assert every.calls == 4 and math.isclose(every.prefix_share_mean, (0 + 0.75 + 0.8 + 0) / 4)
    assert s["a"][""].calls == 1 and math.isclose(s["a"][""].system_share_mean, 0.1)


def test_traces_with_and_without_the_new_fields_load(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"kind":"call","request":"r","llm":"a","t_start":0,"t_end":1,"prompt_tokens":10}\n'
                 '{"kind":"call","request":"r","llm":"a","t_start":1,"t_end":2,"prompt_tokens":20,'
                 '"prefix_tokens":16,"system_tokens":0}\n')
    old, new = read_trace(p).calls
    assert (old.prefix_tokens, old.system_tokens) == (None, None)
    assert (new.prefix_tokens, new.system_tokens) == (16, 0)
