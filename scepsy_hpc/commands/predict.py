"""`scepsy predict`: the ALP predictors for a workflow, a plan and an arrival rate."""

from __future__ import annotations

import argparse
import json
from typing import Any

from scepsy_hpc.commands.argtypes import count, non_negative_int, positive_float
from scepsy_hpc.commands.common import graphs_for, jsonable, make_console, profile_source, resolve_input
from scepsy_hpc.planning.request import DEFAULT_SAMPLES


def add_arguments(sub: Any) -> None:
    """The `predict` subcommand's arguments."""
    pr = sub.add_parser("predict", help="predict workflow latency and throughput for a plan at a rate (ALP)")
    pr.add_argument("workflow", metavar="WORKFLOW", help="workflow file or shipped name")
    pr.add_argument("--plan", required=True, help="plan file or shipped name")
    pr.add_argument("--rate", type=positive_float, required=True, metavar="RPS", help="workflow arrival rate, requests per second")
    pr.add_argument("--predictor", choices=("alp-cp", "alp-paper"), default="alp-cp",
                    help="alp-cp (ours: critical path, tools, per-call sizes; default) or alp-paper (Σ L·n/p)")
    pr.add_argument("--trace", metavar="FILE", help="statistics from this trace (default: sample the program unloaded)")
    pr.add_argument("--profiles", metavar="DIR", help="measured profiles (default: synthesise from the performance model)")
    pr.add_argument("--samples", type=count, default=DEFAULT_SAMPLES, metavar="N",
                    help="program samples without --trace (default 1000)")
    pr.add_argument("--seed", type=non_negative_int, default=0)
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Predict workflow latency and throughput under a plan at a rate."""
    from scepsy_hpc.planning.inputs import load_workload
    from scepsy_hpc.predict.alp import predict
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.plan import load_plan, replicas_of
    from scepsy_hpc.spec.workflow import load_workflow
    from scepsy_hpc.trace.stats import aggregate

    models, gpus = load_models(args.models), load_gpus(args.gpu_catalog)
    wf = load_workflow(resolve_input(args.workflow, "workflows"), models)
    plan = load_plan(resolve_input(args.plan, "plans"), wf, models, gpus)
    work = load_workload(wf, args.trace, args.samples, args.seed)
    source = profile_source(wf, models, gpus, work, args.profiles, args.seed)
    profiles = source.for_allocation(plan.allocation, plan.gpus.type)
    graphs = graphs_for(work, profiles)
    stats = aggregate(graphs, wf.name)
    replicas = {m: replicas_of(a) for m, a in plan.allocation.items()}
    pred = predict(args.predictor, graphs, profiles, replicas, args.rate, stats)
    prov = {m: {"source": p.source, "engine": p.engine, "gpu": p.gpu, "tp": p.tp, "gpu_frac": p.gpu_frac,
                "capacity_rps": p.capacity_rps} for m, p in profiles.items()}
    if args.json:
        out = {**pred.to_dict(), "saturated": pred.saturated, "workload": work.source,
               "profiles": args.profiles or "synthetic (performance model)", "profile_provenance": prov}
        print(json.dumps(jsonable(out), indent=2))
        return 0
    _print(pred, plan, work.source, args.profiles)
    return 0


def _print(pred: Any, plan: Any, source: str, profiles_dir: str | None) -> None:
    from rich.table import Table

    c = make_console()
    t = Table(title=f"{plan.workflow}: {pred.predictor} at {pred.rate_rps:g} rps on {plan.gpus.count}× {plan.gpus.type}")
    t.add_column("LLM", no_wrap=True)
    for col in ("repl", "calls/req", "load/repl", "capacity", "util", "call lat s", "term s"):
        t.add_column(col, justify="right", no_wrap=True)
    for m, p in pred.per_llm.items():
        mark = " *" if m == pred.bottleneck_llm else ""
        t.add_row(m + mark, str(p.replicas), f"{p.calls_per_request:.2f}", f"{p.load_rps:.3f}", f"{p.capacity_rps:.2f}",
                  f"{p.utilisation:.0%}", f"{p.call_latency_s:.2f}", f"{p.stage_s:.2f}")
    c.print(t)
    lat = "saturated (∞)" if pred.saturated else f"{pred.latency_s:.2f} s"
    c.print(f"latency {lat}   throughput {pred.throughput_rps:.3f} rps (bottleneck {pred.bottleneck_llm}, marked *)"
            + (f"   tools+orchestration on the critical path {pred.tool_s:.2f} s" if pred.predictor == "alp-cp" else ""))
    c.print(f"statistics: {source}; profiles: {profiles_dir or 'synthetic (performance model)'}")
    if pred.saturated:
        c.print(f"[yellow]{pred.rate_rps:g} rps is past the predicted capacity {pred.throughput_rps:.3f} rps[/yellow]")
