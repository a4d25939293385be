"""`scepsy stats` (a trace's per-LLM statistics) and `scepsy trace` (record a trace locally)."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from scepsy_hpc.commands.argtypes import count, non_negative_int, positive_float
from scepsy_hpc.commands.common import jsonable, make_console


def add_arguments(sub: Any) -> None:
    """The `trace` and `stats` subcommands' arguments."""
    tr = sub.add_parser("trace", help="run a workflow through the gateway against local simulated engines; write its trace")
    tr.add_argument("workflow", metavar="WORKFLOW", help="workflow file or shipped name")
    tr.add_argument("--requests", type=count, default=20, metavar="N", help="requests to run (default 20)")
    tr.add_argument("--rate", type=positive_float, metavar="RPS", help="open-loop Poisson arrivals (model time); default closed loop")
    tr.add_argument("--concurrency", type=count, default=4, metavar="C", help="requests in flight without --rate (default 4)")
    tr.add_argument("--driver", choices=("program", "entrypoint"),
                    help="run the spec's program, or its driver.entrypoint (real code); default: entrypoint if the spec has one")
    tr.add_argument("--plan", help="engines per this plan (default: one replica per LLM at the smallest tp that fits)")
    tr.add_argument("--gpu", default="h100-sxm", help="GPU type the simulated engines model without --plan (default h100-sxm)")
    tr.add_argument("--time-scale", type=positive_float, default=0.05, metavar="S",
                    help="wall seconds per model second for engines and tools (default 0.05: 20x faster)")
    tr.add_argument("--id-style", choices=("header", "path"), default="header",
                    help="send the request id as X-Scepsy-Request header or /r/ID/v1 path prefix (program driver)")
    tr.add_argument("-o", "--output", metavar="FILE", help="trace file (default WORKFLOW.trace.jsonl)")
    tr.add_argument("--append", action="store_true", help="append to an existing trace instead of replacing it")
    tr.add_argument("--log-dir", metavar="DIR", help="engine logs (default: a temp dir)")
    tr.add_argument("--seed", type=non_negative_int, default=0)
    tr.set_defaults(run=run)

    st = sub.add_parser("stats", help="per-LLM statistics of a trace (n, p, tokens, shares, critical path)")
    st.add_argument("trace", metavar="TRACE", help="JSONL trace (from `scepsy trace`, the gateway or `simulate --trace`)")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """`scepsy trace` or `scepsy stats`."""
    return cmd_trace(args) if args.command == "trace" else cmd_stats(args)


def cmd_stats(args: argparse.Namespace) -> int:
    """Print a trace's per-LLM statistics."""
    from dataclasses import asdict

    from scepsy_hpc.trace.graph import from_trace
    from scepsy_hpc.trace.records import read_trace
    from scepsy_hpc.trace.stats import aggregate, prefix_shares

    trace = read_trace(args.trace)
    graphs = from_trace(trace)
    stats = aggregate(graphs, str(trace.meta.get("workflow", "")))
    errors = sum(1 for c in trace.calls if c.status != "ok")
    # prompt reuse by the gateway's accounting (calls with prefix/system counts; older traces have none)
    prefix = prefix_shares(trace.calls)
    tools = tool_span_counts(trace.spans)
    if args.json:
        doc = stats.to_dict()
        for llm, per in prefix.items():
            if llm in doc["per_llm"]:
                doc["per_llm"][llm]["prefix"] = {role: asdict(ps) for role, ps in per.items()}
        print(json.dumps(jsonable({**doc, "calls": len(trace.calls), "failed_calls": errors,
                                   "tool_spans": sum(tools.values()), "tool_spans_by_name": tools,
                                   "meta": trace.meta}), indent=2))
        return 0
    print_stats(stats, args.trace, len(trace.calls), errors, prefix, tools)
    return 0


def tool_span_counts(spans) -> dict[str, int]:
    """Tool spans of a trace per tool name ("" for unnamed ones): posted by the workflow or inferred by
    the gateway from tool calls and their results."""
    out: dict[str, int] = {}
    for sp in spans:
        if sp.span == "tool":
            out[sp.name or ""] = out.get(sp.name or "", 0) + 1
    return dict(sorted(out.items()))


def _f(x: float, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def print_stats(stats, name: str, calls: int, failed_calls: int, prefix: dict | None = None,
                tools: dict[str, int] | None = None) -> None:
    """The stats table (rich). `prefix` (trace.stats.prefix_shares) adds a prompt-reuse table when the trace
    has the gateway's counts; `tools` (tool_span_counts) adds a line counting tool spans."""
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
    if prefix:
        c.print(_reuse_table(prefix))
        c.print("own prefix: share of a prompt shared with an earlier call of its request; shared sys: with other "
                "requests (16-token blocks)")
    if tools is not None:
        c.print(f"tool spans: {sum(tools.values())}"
                + (" (" + ", ".join(f"{k or '(unnamed)'} {v}" for k, v in tools.items()) + ")" if tools else ""))
    c.print(f"end-to-end latency mean {_f(stats.latency_mean_s, '.2f')} s, CV {_f(stats.latency_cv, '.2f')}   "
            f"LLM time per request {_f(stats.llm_time_mean_s, '.2f')} s   on the critical path: tools "
            f"{_f(stats.tool_cp_mean_s, '.2f')} s, orchestration gaps {_f(stats.gap_cp_mean_s, '.2f')} s")
    cvs = [s.share_cv for s in stats.per_llm.values() if s.share_cv is not None and not math.isnan(s.share_cv)]
    if cvs and stats.latency_cv and not math.isnan(stats.latency_cv):
        c.print(f"share stability: the CV of each LLM's share is {min(cvs):.2f}–{max(cvs):.2f}, "
                f"against {stats.latency_cv:.2f} for end-to-end latency")
    if stats.failed or failed_calls:
        c.print(f"[yellow]{stats.failed} failed request(s) and {failed_calls} failed call(s) left out[/yellow]")


def _reuse_table(prefix: dict):
    """Per LLM (and role) the mean share of a prompt shared with an earlier call of its request ("own
    prefix") and with other requests' prompts ("shared sys"), from trace.stats.prefix_shares."""
    from rich.table import Table

    t = Table(title="prompt reuse")
    t.add_column("LLM / role", no_wrap=True)
    for col in ("calls", "own prefix", "shared sys"):
        t.add_column(col, justify="right", no_wrap=True)
    for m, per in prefix.items():
        for role, ps in sorted(per.items(), key=lambda kv: kv[0] != "*"):
            if role != "*" and set(per) == {"", "*"}:
                continue  # no roles: the LLM's row says it all
            t.add_row(m if role == "*" else f"  {role or '(no role)'}", str(ps.calls),
                      _f(ps.prefix_share_mean, ".1%"), _f(ps.system_share_mean, ".1%"))
    return t


def default_allocation(wf, models, gpu, gpu_name: str) -> dict:
    """One replica per LLM at the smallest tp whose memory fits on whole GPUs."""
    from scepsy_hpc.errors import InfeasibleError, ScepsyError
    from scepsy_hpc.perf.fit import check_fit
    from scepsy_hpc.perf.model import TP_DEGREES, EngineConfig
    from scepsy_hpc.spec.plan import LLMAlloc
    from scepsy_hpc.spec.workflow import resolve_model

    out = {}
    for llm in wf.llms:
        model = resolve_model(wf, llm, models)
        for tp in TP_DEGREES:
            try:
                check_fit(EngineConfig(model, gpu, tp=tp))
            except ScepsyError:
                continue
            out[llm] = LLMAlloc(tp=tp, gpu_frac=1.0, replicas=1)
            break
        else:
            raise InfeasibleError(f"LLM {llm!r} does not fit on {max(TP_DEGREES)} {gpu_name} GPUs")
    return out


def cmd_trace(args: argparse.Namespace) -> int:
    """Run a workflow against local simulated engines behind the gateway and write its trace."""
    import asyncio
    import os
    import tempfile
    from pathlib import Path

    import yaml

    from scepsy_hpc.commands.common import resolve_input
    from scepsy_hpc.engine.local import SimEngineSpec, sim_engines
    from scepsy_hpc.spec.records import write_atomic
    from scepsy_hpc.errors import SpecError
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.plan import load_plan, replica_groups
    from scepsy_hpc.spec.workflow import load_workflow

    models, gpus = load_models(args.models), load_gpus(args.gpu_catalog)
    wf_path = resolve_input(args.workflow, "workflows")
    wf = load_workflow(wf_path, models)
    driver = args.driver or ("entrypoint" if wf.driver is not None else "program")
    if driver == "entrypoint" and wf.driver is None:
        raise SpecError(f"{wf_path}: --driver entrypoint needs a 'driver: {{entrypoint: module:function}}' in the workflow")
    if args.plan:
        plan = load_plan(resolve_input(args.plan, "plans"), wf, models, gpus)
        allocation, gpu_name = dict(plan.allocation), plan.gpus.type
    else:
        gpu_name = args.gpu
        if gpu_name not in gpus:
            raise SpecError(f"--gpu {gpu_name}: unknown GPU type; known: {', '.join(gpus)}")
        allocation = default_allocation(wf, models, gpus[gpu_name], gpu_name)
    specs, owners = [], []
    for llm, entry in allocation.items():
        ref = wf.llms[llm].model
        if not isinstance(ref, str):
            raise SpecError(f"{wf_path}: LLM {llm!r} has an inline model; local engines need a model of the catalog by name")
        for a in replica_groups(entry):
            specs.append(SimEngineSpec(model=ref, gpu=gpu_name, tp=a.tp, gpu_frac=a.gpu_frac, served_model_name=llm,
                                       tool_call_rate=wf.llms[llm].tool_call_rate,
                                       prefix_caching=wf.llms[llm].prefix_caching,
                                       **({"max_num_seqs": a.max_num_seqs} if a.max_num_seqs else {})))
            owners.append(llm)
    out = Path(args.output or f"{wf.name}.trace.jsonl")
    if out.exists() and not args.append:
        out.unlink()  # a fresh trace unless --append (the gateway then numbers calls on from the file's last)
    # Real workflow code paces its own simulated tools by this (examples/openai_fanout).
    os.environ["SCEPSY_TIME_SCALE"] = str(args.time_scale)
    work = Path(tempfile.mkdtemp(prefix="scepsy-trace-"))
    log_dir = Path(args.log_dir) if args.log_dir else work / "logs"
    err = make_console(stderr=True)
    err.print(f"starting {len(specs)} simulated engine(s) at time scale {args.time_scale:g} (logs in {log_dir})")
    with sim_engines(specs, args.time_scale, log_dir, seed=args.seed) as engines:
        llms: dict[str, dict] = {}
        for llm, eng in zip(owners, engines):
            llms.setdefault(llm, {"served_model": llm, "replicas": []})["replicas"].append(eng.url)
        endpoints = work / "endpoints.yaml"
        write_atomic(endpoints, yaml.safe_dump({"time_scale": args.time_scale, "llms": llms}, sort_keys=False))
        result = asyncio.run(_drive(args, wf, wf_path, driver, endpoints, out))
        behind = _lagging(engines, args.time_scale)
    err.print(result.summary())
    for url, lag_ms in behind:
        err.print(f"[yellow]engine {url} fell behind its time scale (iterations {lag_ms:.1f} ms late on average, "
                  f"model time): timings in this trace are stretched; run with a larger --time-scale[/yellow]")
    for e in result.errors()[:5]:
        err.print(f"[red]{e}[/red]")
    print(f"{out}: trace of {len(result.requests)} request(s) of {wf.name} ({driver} driver); "
          f"read it with `scepsy stats {out}`")
    return 0 if result.n_ok else 1


def _lagging(engines, time_scale: float, max_lag_model_s: float = 0.1) -> list[tuple[str, float]]:
    """Engines whose tokens went out late on average by more than `max_lag_model_s` (model time)."""
    from scepsy_hpc.profile.replay import lag_counters

    out = []
    for eng in engines:
        c = lag_counters(eng.url)
        if c is not None and c[1] > 0 and c[0] / c[1] / time_scale > max_lag_model_s:
            out.append((eng.url, 1e3 * c[0] / c[1] / time_scale))
    return out


async def _drive(args, wf, wf_path, driver: str, endpoints, out):
    from scepsy_hpc.drive.entrypoint import drive_entrypoint
    from scepsy_hpc.drive.synthetic import drive_program
    import time

    from scepsy_hpc.gateway.server import start_gateway

    # Appended runs get their own request ids (the gateway's clock also restarts at 0 per run).
    prefix = f"r{int(time.time())}" if args.append else "r"
    gw = await start_gateway(endpoints, out, time_scale=args.time_scale, append_trace=args.append)
    try:
        if driver == "program":
            return await drive_program(wf, gw.url, n_requests=args.requests, rate_rps=args.rate,
                                       concurrency=None if args.rate else args.concurrency, seed=args.seed,
                                       time_scale=args.time_scale, id_style=args.id_style,
                                       request_prefix=prefix)
        return await drive_entrypoint(wf, wf_path.parent, gw.url, n_requests=args.requests, rate_rps=args.rate,
                                      concurrency=args.concurrency, seed=args.seed, time_scale=args.time_scale,
                                      request_prefix=prefix)
    finally:
        await gw.close()
