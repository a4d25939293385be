"""`scepsy simulate`: a workflow served by a plan, in the discrete-event simulator, at a Poisson rate."""

from __future__ import annotations

import argparse
import json
from typing import Any

from scepsy_hpc.commands.argtypes import count, non_negative_int, positive_float, warmup_fraction
from scepsy_hpc.commands.common import jsonable, make_console, resolve_input


def add_arguments(sub: Any) -> None:
    """The `simulate` subcommand's arguments."""
    s = sub.add_parser("simulate", help="simulate a workflow served by a plan")
    s.add_argument("workflow", metavar="WORKFLOW", help="workflow file, or the name of a shipped one (e.g. deep_research)")
    s.add_argument("--plan", required=True, help="plan file, or the name of a shipped one (configs/plans/)")
    s.add_argument("--rate", type=positive_float, required=True, metavar="RPS", help="Poisson arrival rate, requests per second")
    s.add_argument("--requests", type=count, default=500, metavar="N", help="number of requests (default 500)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    s.add_argument("--warmup", type=warmup_fraction, default=0.1, metavar="FRAC",
                   help="fraction of the first requests left out of latency figures (default 0.1)")
    s.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="engines without a prefix cache: every prompt token computed every call")
    s.add_argument("--max-requests", type=count, default=None, metavar="N",
                   help="a gateway that lets at most N requests be in flight: later ones hold (FIFO) until one ends, "
                        "their wait counted in their latency (the gateway's cap: `scepsy up --max-requests`)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--trace", metavar="FILE", help="also write the simulated calls as a JSONL trace")
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Simulate a workflow under a plan at a Poisson arrival rate."""
    from scepsy_hpc.sim import simulate
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.plan import load_plan
    from scepsy_hpc.spec.workflow import load_workflow, without_prefix_caching

    models, gpus = load_models(args.models), load_gpus(args.gpu_catalog)
    wf = load_workflow(resolve_input(args.workflow, "workflows"), models)
    if not args.prefix_caching:
        wf = without_prefix_caching(wf)
    plan = load_plan(resolve_input(args.plan, "plans"), wf, models, gpus)
    res = simulate(wf, plan.allocation, gpus[plan.gpus.type], models, rate_rps=args.rate,
                   n_requests=args.requests, seed=args.seed, warmup_frac=args.warmup, record_calls=bool(args.trace),
                   max_requests=args.max_requests)
    if args.trace:
        from scepsy_hpc.trace.convert import trace_from_sim
        from scepsy_hpc.trace.records import write_trace

        write_trace(args.trace, trace_from_sim(res, {m: str(r.model) for m, r in wf.llms.items()}))
    if args.json:
        print(json.dumps(jsonable(res.to_dict()), indent=2))
    else:
        print_sim(res, plan)
    return 0


def print_sim(res: Any, plan: Any) -> None:
    """The simulated figures as a table per LLM and a summary line."""
    from rich.table import Table

    console = make_console()
    table = Table(title=f"{res.workflow}: {res.requests} requests at {res.rate_rps:g} rps on {plan.gpus.count}× {plan.gpus.type}")
    table.add_column("LLM", no_wrap=True)
    for col in ("tp", "frac", "repl", "calls/req", "lat s", "TTFT s", "queue s", "busy", "prefix hits"):
        table.add_column(col, justify="right", no_wrap=True)
    for llm, s in res.per_llm.items():
        # vLLM's prefix_cache_hits / queries, in tokens ("-": no call of this LLM shares a prefix)
        hits = f"{s.prefix_hit_rate:.0%}" if s.prefix_cache_queries else "-"
        tp, frac = (str(s.tp), f"{s.gpu_frac:g}") if not s.groups else (s.groups, "mixed")
        table.add_row(llm, tp, frac, str(s.replicas), f"{s.calls_per_request:.1f}",
                      f"{s.latency_mean_s:.2f}", f"{s.ttft_mean_s:.3f}", f"{s.queue_mean_s:.3f}", f"{s.utilisation:.0%}",
                      hits)
    console.print(table)
    ok = res.completed == res.requests
    console.print(
        f"completed {res.completed}/{res.requests}   throughput {res.throughput_rps:.3f} rps   "
        f"latency mean {res.latency_mean_s:.2f} s  p50 {res.latency_p50_s:.2f}  p90 {res.latency_p90_s:.2f}  "
        f"p99 {res.latency_p99_s:.2f} s   (first {res.warmup_frac:.0%} of requests excluded as warm-up)"
    )
    console.print(f"{res.llm_calls} LLM calls simulated in {res.wall_s:.2f} s wall "
                  f"({res.llm_calls / max(res.wall_s, 1e-9):,.0f} calls/s), seed {res.seed}" + ("" if ok else "   [red]some requests did not finish[/red]"))
    if res.max_requests is not None:
        console.print(f"at most {res.max_requests} requests in flight: {res.held_requests} of the measured requests held at "
                      f"the gateway, {res.held_mean_s:.2f} s each on average over all of them (in the latency)")
    if res.requests >= 200 and res.throughput_rps < 0.9 * res.rate_rps:
        console.print(f"[yellow]the plan does not keep up: {res.throughput_rps:.3f} rps served of {res.rate_rps:g} offered[/yellow]")
