"""Traces from the simulator: the same records the gateway writes, for runs without HTTP."""

from __future__ import annotations

from typing import Any

from scepsy_hpc.trace.records import CallRecord, SpanRecord, Trace


def trace_from_sim(res: Any, models: dict[str, str] | None = None) -> Trace:
    """A Trace of a SimResult simulated with `record_calls=True` (request spans from arrival to end)."""
    if res.call_records == () and res.llm_calls:
        raise ValueError("simulate with record_calls=True to export a trace")
    calls = tuple(
        CallRecord(request=f"r-{c.request:06d}", llm=c.llm, role=c.role, t_start=c.t_submit, t_first=c.t_first,
                   t_end=c.t_end, prompt_tokens=c.prompt_tokens, completion_tokens=c.output_tokens,
                   replica=f"{c.llm}/{c.replica}", model=(models or {}).get(c.llm), stream=True)
        for c in res.call_records)
    spans = tuple(SpanRecord("request", f"r-{r.id:06d}", r.t_arrive, r.t_end)
                  for r in res.request_records if r.t_end >= 0)
    meta = {"source": "simulator", "workflow": res.workflow, "rate_rps": res.rate_rps, "seed": res.seed, "time_scale": 1.0}
    return Trace(meta, calls, spans)
