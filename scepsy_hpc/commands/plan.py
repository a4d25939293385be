"""`scepsy plan`: allocate GPUs to the LLMs of one or several workflows, by the MILP or a baseline
(planning.plan), and print, write, place, draw or simulate the plan."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from scepsy_hpc.commands.argtypes import (count, gpu_count, non_negative_float, non_negative_int, positive_float, rates)
from scepsy_hpc.commands.common import jsonable, make_console, resolve_input
from scepsy_hpc.errors import SpecError
from scepsy_hpc.planning.request import (DEFAULT_GAP, DEFAULT_MAX_UTIL, DEFAULT_SAMPLES, DEFAULT_SIMULATE_REQUESTS,
                                         DEFAULT_THROUGHPUT_TOL, DEFAULT_TIME_LIMIT_S, POLICIES, PlanRequest, PlanResult)


def add_arguments(sub: Any) -> None:
    """The `plan` subcommand's arguments."""
    pl = sub.add_parser("plan", help="allocate GPUs to a workflow's LLMs: tp, GPU fraction and replicas per LLM")
    pl.add_argument("workflows", nargs="+", metavar="WORKFLOW",
                    help="workflow file(s) or shipped name(s); several share deployments of the same model")
    budget_arguments(pl)
    goal = pl.add_mutually_exclusive_group()
    goal.add_argument("--target-rps", type=rates, metavar="RPS", help="lowest latency at this rate (or WORKFLOW=RPS,...; default: "
                      "each workflow's target)")
    goal.add_argument("--latency-slo", type=positive_float, metavar="S",
                      help="highest rate whose predicted mean latency is ≤ S seconds")
    goal.add_argument("--max-throughput", action="store_true", help="highest rate the GPUs carry, then lowest latency there")
    pl.add_argument("--policy", choices=POLICIES, default="milp",
                    help="milp (default), or a baseline: equal split, independent per-LLM, the paper's enumeration")
    pl.add_argument("-o", "--output", metavar="PLAN.yaml", help="write the plan file")
    pl.add_argument("--trace", metavar="FILE", help="statistics from this trace (one workflow; default: sample the program)")
    pl.add_argument("--profiles", metavar="DIR", help="measured profiles (default: synthesise from the performance model)")
    pl.add_argument("--simulate", action="store_true", help="also simulate the plan at its rate and print what it measures")
    pl.add_argument("--plot", metavar="PLACEMENT.png", help="with --cluster: draw the placement (nodes, GPUs coloured by LLM)")
    pl.add_argument("--requests", type=count, default=DEFAULT_SIMULATE_REQUESTS, metavar="N",
                    help="requests for --simulate (default 500)")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.set_defaults(run=run)


def budget_arguments(p: argparse.ArgumentParser) -> None:
    """--gpus, --gpu-type, --cluster, --max-tp and the tuning flags."""
    p.add_argument("--gpus", dest="gpu_count", type=gpu_count, metavar="N", help="GPUs to plan on (with --gpu-type)")
    p.add_argument("--gpu-type", metavar="TYPE", help="GPU type of the catalog (default h100-sxm, or the cluster's)")
    p.add_argument("--cluster", metavar="CLUSTER.yaml", help="plan on a cluster spec's GPUs and place the plan on its nodes "
                   "(NVLink domains cap tp; the placement goes into the plan file)")
    p.add_argument("--max-tp", type=gpu_count, default=None, metavar="TP", help="largest tp (default: the NVLink domain, or 8)")
    tuning_arguments(p)


def tuning_arguments(p: argparse.ArgumentParser) -> None:
    """The planner's tuning flags (plan and bench)."""
    p.add_argument("--max-util", type=positive_float, default=DEFAULT_MAX_UTIL, metavar="U",
                   help="highest planned utilisation of any LLM (default 0.9: 10%% headroom)")
    p.add_argument("--throughput-tol", type=non_negative_float, default=DEFAULT_THROUGHPUT_TOL, metavar="F",
                   help="--max-throughput (milp): take the lowest-latency allocation whose predicted capacity is "
                        "within F of the most (default 0.03; 0: the most capacity, whatever its latency)")
    p.add_argument("--no-mixed-groups", dest="mixed_groups", action="store_false",
                   help="milp: one configuration per LLM, even where replicas of unlike configurations (a mixed "
                        "group) would be faster or, with --max-throughput, carry more")
    p.add_argument("--time-limit", type=positive_float, default=DEFAULT_TIME_LIMIT_S, metavar="S",
                   help="MILP time limit per solve (default 30 s)")
    p.add_argument("--gap", type=non_negative_float, default=DEFAULT_GAP, metavar="G",
                   help="MILP relative optimality gap (default 1e-6)")
    p.add_argument("--samples", type=count, default=DEFAULT_SAMPLES, metavar="N",
                   help="program samples per workflow (default 1000)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="plan as if the engines had no prefix cache (every prompt token computed every call); by "
                        "default a call that continues a conversation (`context:`) or shares a system prompt "
                        "(`shared_prefix_tokens:`) is charged only what a warm cache leaves")
    p.add_argument("--no-sim-check", dest="sim_check", action="store_false",
                   help="skip the simulator check of the milp plan (its optimum and a shortlist of other allocations "
                        "run in the simulator at the planned rate; the fastest is kept)")
    p.add_argument("--sim-check-throughput", dest="sim_check_throughput", action="store_true",
                   help="with --max-throughput, race the milp plan against many other allocations by simulated "
                        "maximum sustainable rate (minutes on large step-synchronous workflows; by default only the "
                        "plan and the allocation of the most predicted capacity are judged against each other)")


def target_rates(given: list[tuple[str | None, float]] | None, names: list[str], text: str) -> dict[str, float]:
    """--target-rps as a rate per workflow: one rate for all, or NAME=RPS pairs naming given workflows."""
    out: dict[str, float] = {}
    for name, x in given or []:
        if name and name not in names:
            raise SpecError(f"--target-rps {text}: no workflow {name!r} among {', '.join(names)}")
        for n in ([name] if name else names):
            out[n] = x
    return out


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    """The PlanRequest `scepsy plan` ARGS ask for."""
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.cluster import load_cluster
    from scepsy_hpc.spec.workflow import load_workflow, without_prefix_caching

    models, gpus = load_models(args.models), load_gpus(args.gpu_catalog)
    paths = [resolve_input(w, "workflows") for w in args.workflows]
    workflows = tuple(load_workflow(p, models) for p in paths)
    if not args.prefix_caching:
        workflows = tuple(without_prefix_caching(wf) for wf in workflows)
    names = [wf.name for wf in workflows]
    if len(set(names)) != len(names):
        raise SpecError(f"workflow {', '.join(sorted({n for n in names if names.count(n) > 1}))} is given twice")
    if args.trace and len(workflows) > 1:
        raise SpecError("--trace describes one workflow; plan several workflows from their programs")
    if args.plot and not args.cluster:
        raise SpecError("--plot draws the placement: give --cluster CLUSTER.yaml to place the plan")
    cluster = load_cluster(resolve_input(args.cluster, "clusters"), gpus) if args.cluster else None
    text = ",".join(f"{n}={x:g}" if n else f"{x:g}" for n, x in args.target_rps or [])
    goal = "max-throughput" if args.max_throughput else "slo" if args.latency_slo is not None else None
    return PlanRequest(workflows=workflows, models=models, gpus=gpus, policy=args.policy, goal=goal,
                       latency_slo_s=args.latency_slo, target_rps=target_rates(args.target_rps, names, text),
                       gpu_type=args.gpu_type, gpu_count=args.gpu_count, max_tp=args.max_tp, cluster=cluster,
                       cluster_ref=args.cluster, max_util=args.max_util, throughput_tol=args.throughput_tol,
                       mixed_groups=args.mixed_groups, time_limit_s=args.time_limit, gap=args.gap, samples=args.samples, seed=args.seed, trace=args.trace,
                       profiles_dir=args.profiles, sim_check=args.sim_check, sim_check_throughput=args.sim_check_throughput,
                       simulate_requests=args.requests if args.simulate else None,
                       workflow_files=tuple(str(p.resolve()) for p in paths))


def run(args: argparse.Namespace) -> int:
    """Plan an allocation and print/write it."""
    from scepsy_hpc.planning import plan

    request = request_from_args(args)
    console = make_console(stderr=True)
    quiet = args.json or not sys.stderr.isatty()
    result = plan(request, progress=None if quiet else (lambda m: console.print(f"[dim]{m}[/dim]")))
    show(result, json_out=args.json, output=args.output, plot=args.plot)
    return 0


def show(result: PlanResult, *, json_out: bool = False, output: str | None = None, plot: str | None = None) -> dict[str, Any]:
    """Draw the placement (`plot`), write the plan file (`output`), print the plan (as JSON with
    `json_out`); the summary printed."""
    drawn = None
    if plot and result.placement is not None:
        from scepsy_hpc.place.plot import plot_placement

        names = ", ".join(dm.wf.name for dm in result.planner.demands)
        drawn = str(plot_placement(result.placement, result.topology, plot,
                                   title=f"{names} on {result.request.cluster_ref} ({result.request.policy})"))
    if output:
        from scepsy_hpc.planning.render import write_plan

        write_plan(result.to_plan(), output)
    summary = result.summary(plot=drawn, plan_file=output)
    if json_out:
        print(json.dumps(jsonable(summary), indent=2))
    else:
        print_summary(result, summary)
        if result.placement is not None:
            print_placement(result.placement, result.topology)
        if "plot" in summary:
            make_console().print(f"placement drawn in {summary['plot']}")
    return summary


def print_summary(result: PlanResult, s: dict[str, Any]) -> None:
    """The plan as a table per LLM, the predicted figures, the solver's notes."""
    from rich.table import Table

    planner = result.planner
    c = make_console()
    names = ", ".join(dm.wf.name for dm in planner.demands)
    t = Table(title=f"{names}: {s['policy']} ({s['goal']}) on {planner.n_gpus}× {planner.gpu_name}")
    t.add_column("LLM", no_wrap=True)
    t.add_column("model", no_wrap=True)
    for col in ("tp", "frac", "repl", "GPUs", "calls/s", "call s", "util", "path s"):
        t.add_column(col, justify="right", no_wrap=True)
    necks = {p["bottleneck"] for p in s["predicted"]["per_workflow"].values()}
    for row in s["per_llm"]:
        tp, frac = (str(row["tp"]), f"{row['gpu_frac']:g}") if "groups" not in row else (row["groups"], "mixed")
        t.add_row(row["llm"] + (" *" if row["llm"] in necks else ""), row["model"], tp, frac,
                  str(row["replicas"]), f"{row['gpus']:g}", f"{row['load_rps']:.2f}", f"{row['call_latency_s']:.2f}",
                  f"{row['utilisation']:.0%}", f"{row['critical_path_s']:.2f}")
    c.print(t)
    c.print("[dim]calls/s: offered load; call s: mean per-call latency there; path s: the LLM's time on the critical path "
            "per request[/dim]")
    for w, p in s["predicted"]["per_workflow"].items():
        lat = f"{p['latency_s']:.2f} s" if math.isfinite(p["latency_s"]) else "unbounded (saturated)"
        c.print(f"{w}: at {p['rate_rps']:.3g} rps predicted mean latency {lat}, throughput up to {p['throughput_rps']:.3g} rps "
                f"(bottleneck {p['bottleneck']}, marked *)"
                + (f"; gateway request cap {p['max_requests']} (the requests in flight near that capacity)" if p.get("max_requests") else ""))
    c.print(f"GPUs: {s['gpus_used']} of {s['gpus_total']} used, {s['gpus_free']} free   status {s['status']}   "
            f"solve {s['solve_time_s']:.2f} s" + (f" ({s['iterations']} MILP iterations, {s['candidates']} candidates)"
                                                    if s["policy"] == "milp" else ""))
    for n in s["notes"]:
        c.print(f"[dim]{n}[/dim]")
    if s["status"] == "under-capacity":
        c.print("[yellow]this allocation does not carry the target rate: its latency grows without bound[/yellow]")
    if "simulated" in s:
        m = s["simulated"]
        c.print(f"simulated {m['requests']} requests at {m['rate_rps']:.3g} rps: throughput {m['throughput_rps']:.3g} rps, "
                f"mean latency {m['latency_mean_s']:.2f} s (p99 {m['latency_p99_s']:.2f} s); predicted "
                f"{s['predicted']['latency_s']:.2f} s")
    if "plan_file" in s:
        c.print(f"plan written to {s['plan_file']}")


def placement_rows(placement: Any, topo: Any) -> list[tuple[str, str, str]]:
    """(node, leaf, GPU → instances) per node used, for the human table."""
    rows = []
    for name in placement.nodes():
        node = topo.node(name)
        per_gpu: dict[int, list[str]] = {}
        for p in placement.instances:
            if p.node == name:
                for g in p.gpus:
                    per_gpu.setdefault(g, []).append(f"{p.llm}·{p.replica}" + (f" ({p.gpu_frac:g})" if p.gpu_frac < 1 else ""))
        cells, run = [], []   # consecutive GPUs with the same instances print as one range
        for g in sorted(per_gpu) + [None]:
            if run and (g is None or g != run[-1] + 1 or per_gpu[g] != per_gpu[run[0]]):
                span = str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"
                cells.append(f"{span}: {' + '.join(per_gpu[run[0]])}")
                run = []
            if g is not None:
                run.append(g)
        rows.append((name, str(node.leaf or "-"), "   ".join(cells)))
    return rows


def print_placement(placement: Any, topo: Any) -> None:
    """The placement as a table per node, and its fragmentation."""
    from rich.table import Table

    c = make_console()
    t = Table(title="placement (instance = LLM·replica; GPU fraction in brackets)")
    t.add_column("node", no_wrap=True)
    t.add_column("leaf", no_wrap=True)
    t.add_column("GPU: instances")
    for row in placement_rows(placement, topo):
        t.add_row(*row)
    c.print(t)
    f = placement.fragmentation
    c.print(f"nodes {f.nodes_used} (lower bound {f.nodes_min}), leaf switches {f.leaves_used} (lower bound {f.leaves_min}), "
            f"{f.partial_gpus} partly used GPU(s), {f.idle_gpus_on_used_nodes} idle GPU(s) on used nodes, "
            f"{f.free_whole_nodes} whole node(s) left free; placed in {placement.solve_time_s * 1000:.1f} ms ({placement.method})")
