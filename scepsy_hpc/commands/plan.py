"""`scepsy plan`: allocate GPUs to the LLMs of one or several workflows, by the MILP or a baseline."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from scepsy_hpc.commands.common import jsonable, load_workload, make_console, resolve_input
from scepsy_hpc.commands.placing import check_plot_args, plan_and_place, print_placement
from scepsy_hpc.errors import ScepsyError, SpecError


def budget_from_args(args: argparse.Namespace, gpus: dict[str, Any]) -> tuple[str, int, int, Any]:
    """(GPU type, GPU count, largest tp, topology or None) from --cluster or --gpus/--gpu-type."""
    from scepsy_hpc.spec.cluster import load_cluster
    from scepsy_hpc.topology.build import from_cluster

    gpu_type, count, max_tp, topo = args.gpu_type, args.gpu_count, args.max_tp, None
    if args.cluster:
        spec = load_cluster(resolve_input(args.cluster, "clusters"), gpus)
        topo = from_cluster(spec, gpus) if spec.node_groups else discovered_topology(spec, gpus, gpu_type)
        counts: dict[str, int] = {}
        for n in topo.nodes:
            counts[n.gpu_type] = counts.get(n.gpu_type, 0) + sum(len(d) for d in n.free())
        if gpu_type is None:
            if len(counts) > 1:
                raise SpecError(f"{args.cluster}: the cluster has GPU types {', '.join(f'{g} ({n})' for g, n in counts.items())}; "
                                f"a plan uses one type: pick it with --gpu-type")
            gpu_type = next(iter(counts))
        if gpu_type not in counts:
            raise SpecError(f"--gpu-type {gpu_type}: cluster {spec.name!r} has no such GPUs; it has {', '.join(counts)}")
        count = min(count, counts[gpu_type]) if count else counts[gpu_type]
        domain = max(len(d) for n in topo.nodes if n.gpu_type == gpu_type for d in n.free())
        max_tp = min(max_tp or domain, domain)
    if not count:
        raise SpecError("give the GPUs to plan on: --gpus N (with --gpu-type TYPE) or --cluster CLUSTER.yaml")
    gpu_type = gpu_type or "h100-sxm"
    if gpu_type not in gpus:
        from scepsy_hpc.spec.source import suggest
        raise SpecError(f"--gpu-type {gpu_type}: unknown GPU type; {suggest(gpu_type, gpus)}")
    return gpu_type, count, max_tp or 8, topo


def discovered_topology(spec: Any, gpus: dict[str, Any], gpu_type: str | None) -> Any:
    """The usable GPU nodes of the cluster spec's Slurm partition, with their free GPUs."""
    from scepsy_hpc.topology.build import catalog_type, from_slurm
    from scepsy_hpc.topology.discover import discover
    from scepsy_hpc.topology.model import Topology

    network, nodes = discover(partition=spec.slurm.partition)
    parts, unmapped = [], []
    for sn in nodes:
        if sn.gpus <= 0 or not sn.usable:
            continue
        try:
            kind = catalog_type(sn.gpu_type, gpus, spec.slurm.gpu_types)
        except ScepsyError as exc:
            unmapped.append(exc)
            continue
        if gpu_type is None or kind == gpu_type:
            parts += from_slurm([sn], network, kind, gpus[kind].mem_gib, default_nvlink=spec.slurm.nvlink).nodes
    if not parts and unmapped:
        raise unmapped[0]
    if not parts:
        raise SpecError(f"partition {spec.slurm.partition!r} of cluster {spec.name!r} has no usable GPU nodes"
                        + (f" with {gpu_type}" if gpu_type else "") + " (see `scepsy topology show --slurm`)")
    return Topology(tuple(parts), network)


def _parse_rates(arg: str | None, names: list[str]) -> dict[str, float]:
    """--target-rps: one number for every workflow, or NAME=RPS pairs."""
    if arg is None:
        return {}
    out: dict[str, float] = {}
    for part in arg.split(","):
        name, _, val = part.rpartition("=")
        try:
            x = float(val)
        except ValueError:
            raise SpecError(f"--target-rps {arg}: {val!r} is not a number; give RPS or WORKFLOW=RPS,...") from None
        if x <= 0:
            raise SpecError(f"--target-rps {arg}: rates must be positive")
        if name and name not in names:
            raise SpecError(f"--target-rps {arg}: no workflow {name!r} among {', '.join(names)}")
        for n in ([name] if name else names):
            out[n] = x
    return out


def build_planner(args: argparse.Namespace, workflows: list[Any], models: Any, gpus: Any, gpu_type: str, count: int,
                  max_tp: int, weights: dict[str, float], progress: Any = None) -> Any:
    """A Planner over the workflows' sampled programs (or the trace, for one workflow)."""
    from scepsy_hpc.allocate.planner import Demand, Planner

    demands = []
    for wf in workflows:
        work = load_workload(wf, getattr(args, "trace", None), args.samples, args.seed)
        demands.append(Demand(wf, weights[wf.name], work.mix, work.seqs, list(work.graphs)))
    planner = Planner(demands, models, gpus, gpu_type, count, max_tp=max_tp, max_util=args.max_util,
                      throughput_tol=args.throughput_tol,
                      profiles_dir=getattr(args, "profiles", None), seed=args.seed, time_limit_s=args.time_limit,
                      gap=args.gap, progress=progress)
    attach_check(planner, args)
    return planner


def attach_check(planner: Any, args: argparse.Namespace) -> None:
    """Give the planner its simulator check unless --no-sim-check (allocate.simcheck); the
    throughput goal's race only with --sim-check-throughput."""
    from scepsy_hpc.allocate.simcheck import SimCheck

    if getattr(args, "sim_check", True):
        planner.check = SimCheck(seed=getattr(args, "seed", 0), throughput=getattr(args, "sim_check_throughput", False))


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan an allocation and print/write it."""
    from scepsy_hpc.allocate import policies
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.workflow import load_workflow

    models, gpus = load_models(args.models), load_gpus(args.gpu_catalog)
    workflows = [load_workflow(resolve_input(w, "workflows"), models) for w in args.workflows]
    names = [wf.name for wf in workflows]
    if len(set(names)) != len(names):
        raise SpecError(f"workflow {', '.join(sorted({n for n in names if names.count(n) > 1}))} is given twice")
    if args.trace and len(workflows) > 1:
        raise SpecError("--trace describes one workflow; plan several workflows from their programs")
    check_plot_args(args)
    gpu_type, count, max_tp, topo = budget_from_args(args, gpus)
    cli_rates = _parse_rates(args.target_rps, names)
    mode, slo = _mode(args, workflows, cli_rates)
    weights = {wf.name: cli_rates.get(wf.name) or (wf.target.throughput_rps if wf.target and wf.target.throughput_rps else 1.0)
               for wf in workflows}
    console = make_console(stderr=True)
    quiet = args.json or not sys.stderr.isatty()
    planner = build_planner(args, workflows, models, gpus, gpu_type, count, max_tp, weights,
                            progress=None if quiet else (lambda m: console.print(f"[dim]{m}[/dim]")))
    placement = None
    if topo is not None:
        out, placement = plan_and_place(planner, args.policy, mode, slo, topo)
    else:
        out = policies.run(planner, args.policy, mode, slo)
    plan = to_plan(planner, out, args.policy, mode, slo, args)
    summary = summarise(planner, out, args.policy, mode)
    if placement is not None:
        plan = plan.model_copy(update={"placement": placement.entries()})
        summary["placement"] = placement.as_list()
        summary["fragmentation"] = placement.fragmentation.as_dict()
        summary["cluster"] = args.cluster
        if args.plot:
            from scepsy_hpc.place.plot import plot_placement

            summary["plot"] = str(plot_placement(placement, topo, args.plot,
                                                 title=f"{', '.join(names)} on {args.cluster} ({args.policy})"))
    if args.output:
        write_plan(plan, args.output)
        summary["plan_file"] = args.output
    sim = simulate_plan(planner, plan, out, args) if args.simulate else None
    if sim is not None:
        summary["simulated"] = sim
    if args.json:
        print(json.dumps(jsonable(summary), indent=2))
    else:
        print_summary(planner, out, summary, args)
        if placement is not None:
            print_placement(placement, topo)
        if "plot" in summary:
            make_console().print(f"placement drawn in {summary['plot']}")
    return 0


def _mode(args: argparse.Namespace, workflows: list[Any], cli_rates: dict[str, float]) -> tuple[str, float | None]:
    chosen = [m for m, on in (("max-throughput", args.max_throughput), ("slo", args.latency_slo is not None)) if on]
    if len(chosen) > 1:
        raise SpecError("give one goal: --target-rps, --latency-slo or --max-throughput")
    if chosen:
        return chosen[0], args.latency_slo
    if cli_rates:
        return "target", None
    no_rate = [wf.name for wf in workflows if not (wf.target and wf.target.throughput_rps)]
    if not no_rate:
        return "target", None
    slos = {wf.target.latency_slo_s for wf in workflows if wf.target and wf.target.latency_slo_s}
    if len(slos) == 1 and len(no_rate) == len(workflows):
        return "slo", slos.pop()
    raise SpecError(f"workflow(s) {', '.join(no_rate)} have no target throughput_rps; give --target-rps RPS, "
                    f"--latency-slo SECONDS or --max-throughput")


def to_plan(planner: Any, out: Any, policy: str, mode: str, slo: float | None, args: argparse.Namespace) -> Any:
    """The plan file content."""
    from scepsy_hpc.spec.plan import GPUBudget, LLMAlloc, Plan
    from scepsy_hpc.spec.workflow import Target

    single = len(planner.demands) == 1
    alloc = {d: LLMAlloc(tp=c.tp, gpu_frac=c.gpu_frac, replicas=c.replicas) for d, c in out.choice.items()}
    names = [dm.wf.name for dm in planner.demands]
    rate = out.rates[names[0]]
    target = Target(throughput_rps=round(rate, 6), latency_slo_s=slo) if single else None
    routes = None if single else {dm.wf.name: {llm: planner.dep_of[i, llm] for llm in dm.wf.llms}
                                  for i, dm in enumerate(planner.demands)}
    predicted = {w: {"rate_rps": round(out.rates[w], 6), "latency_s": _r(p.latency_s), "throughput_rps": _r(p.throughput_rps),
                     "bottleneck": p.bottleneck_llm, "predictor": p.predictor} for w, p in out.predictions.items()}
    solver = {"policy": policy, "goal": mode, "status": out.status, "solve_time_s": round(out.solve_time_s, 4),
              "iterations": out.iterations, "candidates": out.candidates, "max_util": planner.max_util,
              "time_limit_s": planner.time_limit_s, "notes": list(out.notes)}
    if out.checked:
        solver["sim_check_s"] = round(out.check_time_s, 2)
    provenance = {"profiles": getattr(args, "profiles", None) or "synthetic (performance model)",
                  "statistics": getattr(args, "trace", None) or f"program samples ({args.samples}, seed {args.seed})",
                  "workflow_file": [str(resolve_input(w, "workflows").resolve()) for w in args.workflows]}
    if single:
        provenance["workflow_file"] = provenance["workflow_file"][0]
    return Plan(workflow=names[0] if single else None, workflows=None if single else names,
                gpus=GPUBudget(type=planner.gpu_name, count=planner.n_gpus), allocation=alloc, target=target,
                predicted=predicted[names[0]] if single else predicted, solver=solver, routes=routes, provenance=provenance,
                notes=f"planned by `scepsy plan --policy {policy}` ({mode})")


def _r(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


def write_plan(plan: Any, path: str) -> None:
    """Write the plan as YAML (readable back by `load_plan`)."""
    import yaml

    data = plan.model_dump(exclude_none=True, mode="json")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("# written by `scepsy plan`; edit freely: a hand-edited plan is validated like any other\n"
                          + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def summarise(planner: Any, out: Any, policy: str, mode: str) -> dict[str, Any]:
    """The JSON form: status, allocation, predicted, gpus_used, solve_time_s, per-LLM rows."""
    from scepsy_hpc.allocate.planner import used_gpus

    used = used_gpus(out.choice)
    per_llm = []
    for d, c in out.choice.items():
        dep = planner.deployments[d]
        i, llm = dep.members[0]
        p = out.predictions[planner.demands[i].wf.name].per_llm.get(llm)
        spec = planner.demands[i].wf.llms[llm].model
        per_llm.append({"llm": d, "model": spec if isinstance(spec, str) else dep.model.hf_id, "tp": c.tp, "gpu_frac": c.gpu_frac, "replicas": c.replicas,
                        "gpus": c.gpus, "load_rps": p.load_rps * c.replicas if p else 0.0,
                        "capacity_rps": p.capacity_rps if p else 0.0, "utilisation": p.utilisation if p else 0.0,
                        "call_latency_s": p.call_latency_s if p else 0.0,
                        "critical_path_s": sum(out.predictions[planner.demands[j].wf.name].per_llm[m].stage_s
                                               for j, m in dep.members if m in out.predictions[planner.demands[j].wf.name].per_llm)})
    preds = {w: {"rate_rps": out.rates[w], "latency_s": p.latency_s, "throughput_rps": p.throughput_rps,
                 "bottleneck": p.bottleneck_llm, "tool_s": p.tool_s} for w, p in out.predictions.items()}
    first = next(iter(preds.values()))
    return {
        "status": out.status, "policy": policy, "goal": mode,
        "allocation": {d: {"tp": c.tp, "gpu_frac": c.gpu_frac, "replicas": c.replicas} for d, c in out.choice.items()},
        "predicted": {"latency_s": first["latency_s"], "throughput_rps": first["throughput_rps"],
                      "rate_rps": first["rate_rps"], "per_workflow": preds},
        "gpus_used": used, "gpus_free": planner.n_gpus - used, "gpus_total": planner.n_gpus, "gpu_type": planner.gpu_name,
        "solve_time_s": out.solve_time_s, "iterations": out.iterations, "candidates": out.candidates,
        "per_llm": per_llm, "notes": out.notes,
        "sim_check": {"time_s": out.check_time_s, "allocations": [c.to_dict() for c in out.checked]} if out.checked else None,
    }


def simulate_plan(planner: Any, plan: Any, out: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the simulator on the plan at its planned rate (one workflow)."""
    from scepsy_hpc.sim import simulate

    if len(planner.demands) != 1:
        raise SpecError("--simulate runs one workflow; plan them one at a time to simulate")
    wf = planner.demands[0].wf
    rate = out.rates[wf.name]
    res = simulate(wf, plan.allocation, planner.gpus[planner.gpu_name], planner.models, rate_rps=rate,
                   n_requests=args.requests, seed=args.seed)
    return {"rate_rps": rate, "requests": res.requests, "completed": res.completed, "throughput_rps": res.throughput_rps,
            "latency_mean_s": res.latency_mean_s, "latency_p99_s": res.latency_p99_s}


def print_summary(planner: Any, out: Any, s: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.table import Table

    c = make_console()
    names = ", ".join(dm.wf.name for dm in planner.demands)
    t = Table(title=f"{names}: {s['policy']} ({s['goal']}) on {planner.n_gpus}× {planner.gpu_name}")
    t.add_column("LLM", no_wrap=True)
    t.add_column("model", no_wrap=True)
    for col in ("tp", "frac", "repl", "GPUs", "calls/s", "call s", "util", "path s"):
        t.add_column(col, justify="right", no_wrap=True)
    necks = {p["bottleneck"] for p in s["predicted"]["per_workflow"].values()}
    for row in s["per_llm"]:
        t.add_row(row["llm"] + (" *" if row["llm"] in necks else ""), row["model"], str(row["tp"]), f"{row['gpu_frac']:g}",
                  str(row["replicas"]), f"{row['gpus']:g}", f"{row['load_rps']:.2f}", f"{row['call_latency_s']:.2f}",
                  f"{row['utilisation']:.0%}", f"{row['critical_path_s']:.2f}")
    c.print(t)
    c.print("[dim]calls/s: offered load; call s: mean per-call latency there; path s: the LLM's time on the critical path "
            "per request[/dim]")
    for w, p in s["predicted"]["per_workflow"].items():
        lat = f"{p['latency_s']:.2f} s" if math.isfinite(p["latency_s"]) else "unbounded (saturated)"
        c.print(f"{w}: at {p['rate_rps']:.3g} rps predicted mean latency {lat}, throughput up to {p['throughput_rps']:.3g} rps "
                f"(bottleneck {p['bottleneck']}, marked *)")
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
