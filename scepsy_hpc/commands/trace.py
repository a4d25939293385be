"""`scepsy stats` (a trace's per-LLM statistics) and `scepsy trace` (record a trace locally)."""

from __future__ import annotations

import argparse
import json
import math

from scepsy_hpc.commands.common import jsonable, make_console


def cmd_stats(args: argparse.Namespace) -> int:
    """Print a trace's per-LLM statistics."""
    from scepsy_hpc.trace.graph import from_trace
    from scepsy_hpc.trace.records import read_trace
    from scepsy_hpc.trace.stats import aggregate

    trace = read_trace(args.trace)
    graphs = from_trace(trace)
    stats = aggregate(graphs, str(trace.meta.get("workflow", "")))
    errors = sum(1 for c in trace.calls if c.status != "ok")
    if args.json:
        print(json.dumps(jsonable({**stats.to_dict(), "calls": len(trace.calls), "failed_calls": errors,
                                   "meta": trace.meta}), indent=2))
        return 0
    print_stats(stats, args.trace, len(trace.calls), errors)
    return 0


def _f(x: float, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def print_stats(stats, name: str, calls: int, failed_calls: int) -> None:
    """The stats table (rich)."""
    from rich.table import Table

    c = make_console()
    t = Table(title=f"{stats.workflow or name}: {stats.requests} requests, {calls} calls")
    t.add_column("LLM / role", no_wrap=True)
    for col in ("calls/req n", "parallel p", "prompt tok", "output tok", "call lat s", "share", "share CV",
                "crit. path s", "cp share"):
        t.add_column(col, justify="right", no_wrap=True)
    for m, s in stats.per_llm.items():
        t.add_row(m, _f(s.n, ".2f"), _f(s.p, ".2f"), _f(s.prompt_tokens.mean, ".0f"), _f(s.output_tokens.mean, ".0f"),
                  _f(s.call_latency_mean_s, ".2f"), _f(s.share_mean, ".1%"), _f(s.share_cv, ".2f"),
                  _f(s.cp_time_mean_s, ".2f"), _f(s.cp_share, ".1%"))
        if len(s.roles) > 1 or (s.roles and "" not in s.roles):
            for r, rs in s.roles.items():
                t.add_row(f"  {r or '(no role)'}", _f(rs.calls_per_request, ".2f"), "", _f(rs.prompt_tokens.mean, ".0f"),
                          _f(rs.output_tokens.mean, ".0f"), "", "", "", "", "")
    c.print(t)
    c.print(f"end-to-end latency mean {_f(stats.latency_mean_s, '.2f')} s, CV {_f(stats.latency_cv, '.2f')}   "
            f"LLM time per request {_f(stats.llm_time_mean_s, '.2f')} s   on the critical path: tools "
            f"{_f(stats.tool_cp_mean_s, '.2f')} s, orchestration gaps {_f(stats.gap_cp_mean_s, '.2f')} s")
    cvs = [s.share_cv for s in stats.per_llm.values() if s.share_cv is not None and not math.isnan(s.share_cv)]
    if cvs and stats.latency_cv and not math.isnan(stats.latency_cv):
        c.print(f"share stability: the CV of each LLM's share is {min(cvs):.2f}–{max(cvs):.2f}, "
                f"against {stats.latency_cv:.2f} for end-to-end latency")
    if stats.failed or failed_calls:
        c.print(f"[yellow]{stats.failed} failed request(s) and {failed_calls} failed call(s) left out[/yellow]")
