"""`scepsy bench`: milp against the baselines, measured in the simulator.

For each workflow × GPU count × policy:
1. the policy's highest-throughput plan (planner goal max-throughput), and the maximum
   sustainable rate the *simulator* measures for it (sim.capacity: every request completes and
   the backlog's growth, with its batch-means 95% interval, stays under 2% of the arrivals; runs
   still filling or undecided are lengthened, up to 8×, and past that to twice the length their
   latency needs, up to 32×), by bisection from the predicted throughput;
2. the common rates: 90%, 95% and 99% of the weakest policy's measured maximum; at each, every
   policy's plan for that target rate, simulated there (mean and p99 latency, same seed for every
   policy, as many requests as the longest capacity run of the cell needed to fill), and milp's
   mean latency ÷ each policy's (≤ 1: milp is no slower);
3. the fluid upper bound on throughput — every GPU at the best calls/s per GPU of the LLM it
   serves, GPUs divisible at will — and milp's measured fraction of it;
4. the instance bound — the most any set of whole instances on the configuration grid carries,
   replicas of different configurations of one LLM allowed (allocate.milp.instance_bound) — and
   milp's measured fraction of that: how much of the gap to the fluid bound is integrality; the
   bound's own allocation is measured like the policies' plans (its simulated maximum), and
   `milp_instance_sim_fraction` is milp's simulated maximum ÷ that one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import replace
from typing import Any

from scepsy_hpc.commands.argtypes import count, gpu_count, choice_list, int_list, name_list, non_negative_int
from scepsy_hpc.commands.common import jsonable, make_console, resolve_input
from scepsy_hpc.errors import InfeasibleError, SpecError
from scepsy_hpc.planning.request import DEFAULT_GPU_TYPE, DEFAULT_MAX_TP, POLICIES, PlanRequest

COMMON_FRACTIONS = (0.9, 0.95, 0.99)   # latency is compared at these fractions of the weakest policy's maximum


def fluid_bound(planner: Any) -> float:
    """Requests/s if every GPU ran at the best per-GPU efficiency of the LLM it serves (divisible GPUs)."""
    gpu_s = 0.0
    for d in planner.deployments.values():
        if d.calls <= 0:
            continue
        best = max(c.profile.capacity_rps / c.gpus for c in d.configs)
        gpu_s += d.calls / best
    return planner.n_gpus / gpu_s if gpu_s > 0 else math.inf


def instance_bound_rps(planner: Any) -> float:
    """Requests/s of the best set of whole instances (mixed configurations per LLM) the GPUs hold."""
    return instance_bound_plan(planner)[0]


def instance_bound_plan(planner: Any) -> tuple[float, dict[str, Any]]:
    """The instance bound (`instance_bound_rps`) and the choice that reaches it (deployment → its
    instances as one candidate), for the simulator to measure in the same currency as the policies' plans."""
    from scepsy_hpc.allocate.milp import Candidate, instance_bound, mixed_candidate

    live = {n: d for n, d in planner.deployments.items() if d.calls > 0}
    inst = {n: [Candidate(planner.gpu_name, c.tp, c.gpu_frac, 1, 0.0, c.profile.capacity_rps)
                for c in d.configs if c.profile.capacity_rps > 0] for n, d in live.items()}
    theta, counts = instance_bound(inst, {planner.gpu_name: planner.n_gpus}, {n: d.calls for n, d in live.items()},
                                   time_limit_s=planner.time_limit_s, domain_caps=planner.domain_caps)
    return theta, {n: mixed_candidate(k) for n, k in counts.items() if k}


def _capacity(job: tuple[Any, ...]) -> dict[str, Any]:
    from scepsy_hpc.commands.bench_resume import read_runs, run_writer
    from scepsy_hpc.sim.capacity import max_sustainable_rate

    wf, alloc, gpu, models, guess, n, seed, kept = job
    t0 = time.perf_counter()
    known = read_runs(kept)
    res = max_sustainable_rate(wf, alloc, gpu, models, guess, n_requests=n, seed=seed, known=known,
                               on_run=run_writer(kept))
    return {"max_rps": res.sustainable_rps, "refused_rps": res.unsustainable_rps,
            "runs": [[*r, k] for r, k in zip(res.runs, res.requests)],
            "max_requests": max(res.requests, default=n), "wall_s": time.perf_counter() - t0,
            "resumed_runs": sum(r[0] in known for r in res.runs)}


def _latency(job: tuple[Any, ...]) -> dict[str, Any]:
    from scepsy_hpc.commands.bench_resume import memo_json

    wf, alloc, gpu, models, rate, n, seed, kept = job

    def run() -> dict[str, Any]:
        from scepsy_hpc.sim import simulate

        res = simulate(wf, alloc, gpu, models, rate_rps=rate, n_requests=n, seed=seed)
        return {"rate_rps": rate, "throughput_rps": res.throughput_rps, "latency_mean_s": res.latency_mean_s,
                "latency_p99_s": res.latency_p99_s, "completed": res.completed, "requests": res.requests}
    return memo_json(kept, run)


def _kept(d: Any, kind: str, suffix: str, job: tuple[Any, ...]) -> Any:
    """`job` with where its result is kept under `--resume` appended (None without it)."""
    from scepsy_hpc.commands.bench_resume import journal, key_of

    return (*job, journal(d, kind, key_of(kind, *job) if d is not None else "", suffix))


def _alloc(out: Any) -> dict[str, Any]:
    return _alloc_of(out.choice)


def _alloc_of(choice: Any) -> dict[str, Any]:
    from scepsy_hpc.allocate.allocation import as_allocation

    return as_allocation(choice)


def _guess(v: dict[str, Any]) -> float:
    """Where the capacity bisection starts: the rate the simulator check saw the plan sustain, else
    the predicted maximum (which can be far above the simulated one)."""
    from scepsy_hpc.allocate.milp import choice_key

    o = v["plan"]
    seen = [r.sustained_rps for r in o.checked if r.sustained_rps and choice_key(r.choice) == choice_key(o.choice)]
    return seen[0] if seen else v["predicted_rps"]


def short_allocation(choice: Any) -> str:
    """`name:RxtpT` / `name:RxF` per deployment of a choice (deployment → candidate); a mixed group's
    configurations joined by `+`."""
    return " ".join(f"{d}:" + "+".join(f"{g.replicas}x" + (f"tp{g.tp}" if g.gpu_frac >= 1 else f"{g.gpu_frac:g}")
                                       for g in c.groups) for d, c in choice.items())


def _resume_dir(text: str) -> Any:
    """--resume's type: the directory, made private or checked (ours, nobody else may write it)."""
    from scepsy_hpc.commands.bench_resume import open_dir

    try:
        return open_dir(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(sub: Any) -> None:
    """The `bench` subcommand's arguments."""
    from scepsy_hpc.commands.plan import tuning_arguments

    be = sub.add_parser("bench", help="simulated throughput and latency of milp vs. the baselines per workflow and GPU count")
    be.add_argument("--workflows", type=name_list, default="rag_rerank,deep_research,coding_agent,mixture_of_agents,beam_search",
                    metavar="W,W,...", help="shipped names or files (default: the first five shipped: rag_rerank, deep_research, "
                         "coding_agent, mixture_of_agents, beam_search; scripts/bench_table.py runs all)")
    be.add_argument("--gpus", dest="gpu_counts", type=int_list(gpu_count, "8,16"), default="8,16", metavar="N,N,...",
                    help="GPU counts (default 8,16)")
    be.add_argument("--gpu-type", default=DEFAULT_GPU_TYPE, metavar="TYPE", help="GPU type (default h100-sxm)")
    be.add_argument("--max-tp", type=gpu_count, default=DEFAULT_MAX_TP, metavar="TP",
                    help="largest tp, the NVLink domain (default 8)")
    be.add_argument("--policies", type=choice_list(POLICIES, required=("milp",)), default="milp,equal,independent,paper-enum",
                    metavar="P,P,...", help="policies compared, milp among them (default milp,equal,independent,paper-enum)")
    be.add_argument("--requests", type=count, default=1200, metavar="N", help="requests per simulation run (default 1200)")
    be.add_argument("--jobs", type=non_negative_int, default=0, metavar="J", help="parallel processes (default: CPU count)")
    be.add_argument("--resume", type=_resume_dir, metavar="DIR",
                    help="keep each plan and finished simulation in DIR (private, made if missing); the same command "
                         "run again with the same code reuses them: an interrupted bench goes on where it stopped")
    be.add_argument("--plot", metavar="OUT.png", help="plot mean latency vs. rate per policy (matplotlib)")
    be.add_argument("--json", action="store_true", help="print one JSON object")
    tuning_arguments(be)
    be.set_defaults(run=run)


def request_for(args: argparse.Namespace, wf: Any, models: Any, gpus: Any, n: int, policy: str) -> PlanRequest:
    """The max-throughput PlanRequest of one bench cell: `wf` at weight 1 rps on `n` GPUs by `policy`."""
    return PlanRequest(workflows=(wf,), models=models, gpus=gpus, policy=policy, goal="max-throughput",
                       target_rps={wf.name: 1.0}, gpu_type=args.gpu_type, gpu_count=n, max_tp=args.max_tp,
                       max_util=args.max_util, throughput_tol=args.throughput_tol, mixed_groups=args.mixed_groups,
                       time_limit_s=args.time_limit, gap=args.gap, samples=args.samples, seed=args.seed, sim_check=args.sim_check,
                       sim_check_throughput=args.sim_check_throughput)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print (or plot) it."""
    from concurrent.futures import ProcessPoolExecutor

    from scepsy_hpc.commands.bench_resume import is_kept, key_of, memo_plan
    from scepsy_hpc.planning import plan, prepare
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.workflow import load_workflow

    models, gpus = load_models(args.models), load_gpus(args.gpu_catalog)
    counts, pols = list(args.gpu_counts), list(args.policies)
    if args.gpu_type not in gpus:
        raise SpecError(f"--gpu-type {args.gpu_type}: unknown GPU type; the catalog has {', '.join(gpus)}")
    gpu = gpus[args.gpu_type]
    console = make_console(stderr=True)
    jobs = args.jobs or os.cpu_count() or 1
    kept = args.resume
    reused = [0]   # plans read back from --resume
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    cells = []
    for name in args.workflows:
        wf = load_workflow(resolve_input(name, "workflows"), models)
        base = None   # one planner per workflow: its profiles serve every GPU count and policy
        for n in counts:
            try:
                if base is None:
                    base = prepare(request_for(args, wf, models, gpus, n, "milp"))
                    base_n = n   # the planner's GPU count: a kept plan is reused only from a planner made alike
                planner = base.with_budget(n_gpus=n)
                fluid = fluid_bound(planner)
                bound, bound_choice = instance_bound_plan(planner)
            except InfeasibleError as e:
                cells.append({"workflow": wf.name, "gpus": n, "error": str(e)})
                continue
            cell: dict[str, Any] = {"workflow": wf.name, "gpus": n, "fluid_rps": fluid, "instance_bound_rps": bound,
                                    "bound_choice": bound_choice, "policies": {}, "wf": wf}
            for pol in pols:
                try:
                    req = request_for(args, wf, models, gpus, n, pol)
                    o = memo_plan(kept, key_of("plan", req, n, base_n), lambda: plan(req, planner=planner).outcome,
                                  reused)
                    cell["policies"][pol] = {"plan": o, "predicted_rps": next(iter(o.predictions.values())).throughput_rps,
                                             "solve_time_s": o.solve_time_s, "request": req}
                except InfeasibleError as e:
                    cell["policies"][pol] = {"error": str(e)}
            cell["_planner"], cell["base_n"] = planner, base_n
            cells.append(cell)
            console.print(f"[dim]planned {wf.name} on {n} GPUs ({time.perf_counter() - t_start:.0f} s)[/dim]")
    # 1. measured maximum throughput of each policy's max-throughput plan
    cap_jobs = [(c, pol, _kept(kept, "cap", "jsonl", (c["wf"], _alloc(v["plan"]), gpu, models, _guess(v), args.requests,
                                                       args.seed)))
                for c in cells if "error" not in c for pol, v in c["policies"].items() if "plan" in v]
    # ... and of the instance bound's own allocation: the bound in simulated requests/s
    cap_jobs += [(c, None, _kept(kept, "cap", "jsonl", (c["wf"], _alloc_of(c["bound_choice"]), gpu, models,
                                                        c["instance_bound_rps"], args.requests, args.seed)))
                 for c in cells if "error" not in c and c.get("bound_choice")]
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        for (c, pol, _), r in zip(cap_jobs, ex.map(_capacity, [j for _, _, j in cap_jobs])):
            if pol is None:
                c["bound_sim"] = r
            else:
                c["policies"][pol].update(sim=r)
        console.print(f"[dim]measured capacities ({time.perf_counter() - t_start:.0f} s)[/dim]")
        # 2. each policy's plan at each common rate, simulated there
        lat_jobs = []
        for c in cells:
            if "error" in c:
                continue
            maxes = [v["sim"]["max_rps"] for v in c["policies"].values() if "sim" in v and v["sim"]["max_rps"] > 0]
            if not maxes:
                continue
            c["weakest_max_rps"] = min(maxes)
            # as long as the longest capacity run of the cell: a run too short to fill reads low latency
            c["common_requests"] = n_common = max(v["sim"]["max_requests"] for v in c["policies"].values() if "sim" in v)
            planner = c["_planner"]
            for frac in COMMON_FRACTIONS:
                common = frac * min(maxes)
                for pol, v in c["policies"].items():
                    if "plan" not in v:
                        continue
                    try:   # the policy's plan for the common rate (weight 1 rps × rate scale `common`)
                        req = replace(v["request"], goal="target", rate_scale=common)
                        o = memo_plan(kept, key_of("plan", req, c["gpus"], c["base_n"]),
                                      lambda: plan(req, planner=planner).outcome, reused)
                    except InfeasibleError:
                        o = v["plan"]
                    v.setdefault("common_plans", {})[frac] = o
                    lat_jobs.append((c, pol, frac, _kept(kept, "lat", "json", (c["wf"], _alloc(o), gpu, models, common,
                                                                               n_common, args.seed))))
        # policies that plan one allocation for a rate (milp's plan is often `equal`'s at the lower rates)
        # run the very same simulation: it runs once
        keys = [key_of("lat", *j[:-1]) for *_, j in lat_jobs]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        once = sorted(set(first.values()))
        kept_lat = sum(1 for i in once if lat_jobs[i][-1][-1] is not None and is_kept(lat_jobs[i][-1][-1]))
        done = dict(zip(once, ex.map(_latency, [lat_jobs[i][-1] for i in once])))
        for (c, pol, frac, _), k in zip(lat_jobs, keys):
            c["policies"][pol].setdefault("at_common", {})[frac] = dict(done[first[k]])
            c.setdefault("latency_keys", set()).add(k)
    if kept is not None:
        rates = sum(v.get("sim", {}).get("resumed_runs", 0) for c in cells if "error" not in c
                    for v in c["policies"].values()) + sum(c.get("bound_sim", {}).get("resumed_runs", 0)
                                                           for c in cells if "error" not in c)
        console.print(f"[dim]--resume {kept}: reused {reused[0]} plans, {rates} judged rates and {kept_lat} latency "
                      "runs[/dim]", soft_wrap=True)
    for c in cells:
        rows.append(_row(c))
    wall = time.perf_counter() - t_start
    if args.plot:
        _plot(cells, args.plot)
    if args.json:
        print(json.dumps(jsonable({"gpu_type": args.gpu_type, "requests": args.requests, "seed": args.seed,
                                   "wall_s": wall, "cells": rows}), indent=2))
    else:
        _print(rows, args, wall)
    return 0


def _row(c: dict[str, Any]) -> dict[str, Any]:
    """One cell of the report (JSON-ready): bounds, and per policy its capacity and its latency at
    each common rate with milp's mean latency ÷ its own."""
    if "error" in c:
        return {"workflow": c["workflow"], "gpus": c["gpus"], "error": c["error"]}
    weakest = c.get("weakest_max_rps")
    out: dict[str, Any] = {"workflow": c["workflow"], "gpus": c["gpus"], "fluid_rps": c["fluid_rps"],
                           "instance_bound_rps": c["instance_bound_rps"], "weakest_max_rps": weakest,
                           "common_rates": [{"fraction": f, "rate_rps": f * weakest} for f in COMMON_FRACTIONS]
                           if weakest else [],
                           "common_requests": c.get("common_requests"), "policies": {}}
    milp = c["policies"].get("milp", {})
    m_max = milp.get("sim", {}).get("max_rps")
    m_lat = {f: r.get("latency_mean_s") for f, r in milp.get("at_common", {}).items()}
    for pol, v in c["policies"].items():
        if "error" in v:
            out["policies"][pol] = {"error": v["error"]}
            continue
        mx = v.get("sim", {}).get("max_rps")
        at = []
        for f, r in sorted(v.get("at_common", {}).items()):
            lat, ml = r.get("latency_mean_s"), m_lat.get(f)
            at.append({"fraction": f, "rate_rps": r["rate_rps"],
                       "allocation": short_allocation(v["common_plans"][f].choice),
                       "latency_mean_s": lat, "latency_p99_s": r.get("latency_p99_s"),
                       "completed": r.get("completed"), "requests": r.get("requests"),
                       "milp_latency_ratio": (ml / lat) if ml and lat else None})
        out["policies"][pol] = {
            "allocation": short_allocation(v["plan"].choice), "predicted_max_rps": v["predicted_rps"], "sim_max_rps": mx,
            "plan_solve_s": v["solve_time_s"],
            "milp_throughput_ratio": (m_max / mx) if m_max and mx else None,
            "sim_refused_rps": v.get("sim", {}).get("refused_rps"),
            "capacity_max_requests": v.get("sim", {}).get("max_requests"),
            "capacity_wall_s": v.get("sim", {}).get("wall_s"),
            "capacity_runs": v.get("sim", {}).get("runs", []),
            "capacity_resumed_runs": v.get("sim", {}).get("resumed_runs", 0),
            "at_common": at,
            "sim_check_s": v["plan"].check_time_s + sum(o.check_time_s for o in v.get("common_plans", {}).values()),
        }
    b = c.get("bound_sim", {})
    if c.get("bound_choice"):
        out["instance_bound_allocation"] = short_allocation(c["bound_choice"])
        out["instance_bound_sim_rps"] = b.get("max_rps")
        out["instance_bound_runs"] = len(b.get("runs", []))
        out["instance_bound_resumed_runs"] = b.get("resumed_runs", 0)
    out["latency_runs"] = len(c.get("latency_keys", ()))   # distinct simulations behind at_common (alike plans share)
    if m_max:
        out["milp_fluid_fraction"] = m_max / c["fluid_rps"]
        out["milp_instance_fraction"] = m_max / c["instance_bound_rps"]
        if b.get("max_rps"):   # the same allocation-vs-allocation ratio, both measured in the simulator
            out["milp_instance_sim_fraction"] = m_max / b["max_rps"]
    if milp.get("predicted_rps"):
        out["milp_instance_predicted_fraction"] = milp["predicted_rps"] / c["instance_bound_rps"]
    return out


def _triple(xs: list[Any], fmt: str) -> str:
    """Values at the common rates, `a / b / c` (— where missing)."""
    return " / ".join("—" if x is None else format(x, fmt) for x in xs) if xs else "—"


def _print(rows: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=None if os.isatty(1) else 300)  # piped: wide enough for every column unclipped
    pcts = "/".join(f"{f:.0%}".rstrip("%") for f in COMMON_FRACTIONS) + "%"
    t = Table(title=f"scepsy bench: {args.gpu_type}, {args.requests} requests per run, seed {args.seed} (simulated)")
    cols = ("workflow", "GPUs", "policy", "sim max rps", "refused", "pred. max", "milp ×", "longest run",
            f"common rps {pcts}", f"mean lat s {pcts}", f"milp lat ÷ {pcts}", "p99 s @90%",
            "fluid rps", "milp/fluid", "inst. bound pred/sim", "milp/inst. sim", "max-throughput allocation")
    for col in cols:
        t.add_column(col, justify="left" if col in ("workflow", "policy") else "right", no_wrap=True)
    blank = [""] * (len(cols) - 4)
    f = lambda x, p=".3g": "—" if x is None else format(x, p)  # noqa: E731
    pct = lambda x: "" if x is None else f"{x:.0%}"  # noqa: E731
    for r in rows:
        if "error" in r:
            t.add_row(r["workflow"], str(r["gpus"]), "—", f"[yellow]{r['error'][:60]}[/yellow]", *blank)
            continue
        first = True
        for pol, v in r["policies"].items():
            if "error" in v:
                t.add_row(r["workflow"] if first else "", str(r["gpus"]) if first else "", pol, "infeasible", *blank)
                first = False
                continue
            at = v.get("at_common", [])
            t.add_row(r["workflow"] if first else "", str(r["gpus"]) if first else "", pol, f(v["sim_max_rps"]),
                      f(v["sim_refused_rps"]), f(v["predicted_max_rps"]), f(v["milp_throughput_ratio"], ".2f"),
                      f(v["capacity_max_requests"], "d"),
                      _triple([x["rate_rps"] for x in r.get("common_rates", [])], ".3g") if first else "",
                      _triple([x["latency_mean_s"] for x in at], ".1f"),
                      _triple([x["milp_latency_ratio"] for x in at], ".2f"),
                      f(at[0]["latency_p99_s"], ".1f") if at else "—",
                      f(r["fluid_rps"]) if first else "", pct(r.get("milp_fluid_fraction")) if first else "",
                      f"{f(r['instance_bound_rps'])} / {f(r.get('instance_bound_sim_rps'))}" if first else "",
                      pct(r.get("milp_instance_sim_fraction")) if first else "",
                      v["allocation"])
            first = False
    c.print(t)
    c.print("sim max / refused = the highest rate the simulator sustained and the lowest it refused (bisection; "
            "a run is sustained when its backlog's growth, with a 95% batch-means interval, stays under 2% of the "
            "arrivals); longest run = the requests its longest run needed (runs still filling or undecided are "
            "lengthened, up to 8×, and past that to twice the length their latency needs, up to 32×).")
    c.print(f"milp × = milp's simulated max throughput ÷ the policy's; at the common rates ({pcts} of the weakest "
            f"policy's max) each policy runs its plan for that rate: mean latency, and milp lat ÷ = milp's mean latency "
            f"÷ the policy's (≤ 1: milp no slower). fluid = every GPU at its LLM's best calls/s per GPU; inst. bound = "
            f"the best set of whole instances, mixed configurations allowed: predicted, and its allocation's simulated "
            f"max; milp/inst. sim = milp's simulated max ÷ that. {wall:.0f} s wall.")


def _plot(cells: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in cells if "error" not in c]
    if not ok:
        return
    wfs = list(dict.fromkeys(c["workflow"] for c in ok))
    ns = sorted({c["gpus"] for c in ok})
    fig, axes = plt.subplots(len(wfs), len(ns), figsize=(4.2 * len(ns), 3.2 * len(wfs)), squeeze=False)
    for c in ok:
        ax = axes[wfs.index(c["workflow"])][ns.index(c["gpus"])]
        for pol, v in c["policies"].items():
            # the max-throughput plan's sustainable runs as a line; the common-rate plan as a cross
            pts = sorted((r[0], r[3]) for r in v.get("sim", {}).get("runs", []) if r[1])
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=pol) if pts else None
            at = sorted(v.get("at_common", {}).values(), key=lambda r: r["rate_rps"])
            if at:
                color = line[0].get_color() if line else None
                ax.plot([r["rate_rps"] for r in at], [r["latency_mean_s"] for r in at], marker="x", ms=7, color=color,
                        linestyle="none")
        ax.set_title(f"{c['workflow']}, {c['gpus']} GPUs (x: plans for the common rates)", fontsize=9)
        ax.set_xlabel("rate (requests/s)", fontsize=8)
        ax.set_ylabel("mean latency (s)", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
