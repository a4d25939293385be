"""The `scepsy` command. Each subcommand imports only what it needs.

Errors a user can fix are ScepsyErrors: printed without traceback (exit 2 for bad input, 3 for
infeasible requests, 1 otherwise) unless SCEPSY_DEBUG=1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from scepsy_hpc.errors import ScepsyError, SpecError


def _resolve(arg: str, kind: str) -> Path:
    from scepsy_hpc.commands.common import resolve_input

    return resolve_input(arg, kind)


def _kind_of(data: Any, path: Path) -> str:
    if isinstance(data, dict):
        if "allocation" in data:
            return "plan"
        if "program" in data or "llms" in data:
            return "workflow"
        if "node_groups" in data or "slurm" in data:
            return "cluster"
        values = list(data.values())
        if values and all(isinstance(v, dict) and "hf_id" in v for v in values):
            return "models"
        if values and all(isinstance(v, dict) and "mem_gib" in v for v in values):
            return "gpus"
    raise SpecError(f"{path}:1: cannot tell what this file is: a workflow has 'program:', a plan 'allocation:', "
                    f"a cluster 'node_groups:' or 'slurm:', a catalog maps names to models or GPUs")


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate workflow, plan, cluster and catalog files; exit 2 with every problem found."""
    from scepsy_hpc.spec.catalog import _GPUs, _Models, load_gpus, load_models
    from scepsy_hpc.spec.cluster import parse_cluster
    from scepsy_hpc.spec.plan import parse_plan
    from scepsy_hpc.spec.source import load_yaml, validate
    from scepsy_hpc.spec.workflow import load_workflow, parse_workflow

    problems: list[str] = []
    files: list[dict[str, Any]] = []
    models = gpus = None
    seen_wfs: dict[str, Any] = {}   # workflows validated on this command line, by name
    for arg in args.files:
        try:
            path = Path(arg)
            data, smap = load_yaml(path)
            kind = _kind_of(data, path)
            if kind == "models":
                validate(_Models, data, smap)
            elif kind == "gpus":
                validate(_GPUs, data, smap)
            else:
                models = models if models is not None else load_models(args.models)
                gpus = gpus if gpus is not None else load_gpus(args.gpu_catalog)
                if kind == "workflow":
                    w = parse_workflow(data, smap, models)
                    seen_wfs[w.name] = w
                elif kind == "cluster":
                    parse_cluster(data, smap, gpus)
                else:
                    wf = None
                    name = data.get("workflow")
                    prov = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
                    src = prov.get("workflow_file") if isinstance(prov.get("workflow_file"), str) else None
                    if isinstance(name, str):
                        if name in seen_wfs:
                            wf = seen_wfs[name]
                        elif src and Path(src).exists():
                            wf = load_workflow(src, models)
                        else:
                            wf = load_workflow(_resolve(name, "workflows"), models)
                    parse_plan(data, smap, wf, models, gpus)
            files.append({"path": str(path), "kind": kind, "ok": True})
            if not args.json:
                print(f"{path}: ok ({kind})")
        except SpecError as exc:
            files.append({"path": str(arg), "ok": False, "problems": exc.problems})
            problems.extend(exc.problems)
    if args.json:
        print(json.dumps({"ok": not problems, "files": files, "problems": problems}, indent=2))
    else:
        for p in problems:
            print(p, file=sys.stderr)
    return 2 if problems else 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Simulate a workflow under a plan at a Poisson arrival rate."""
    from scepsy_hpc.sim import simulate
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.plan import load_plan
    from scepsy_hpc.spec.workflow import load_workflow

    if args.rate <= 0:
        raise SpecError(f"--rate {args.rate:g}: the arrival rate must be positive (requests per second)")
    if args.requests < 1:
        raise SpecError(f"--requests {args.requests}: simulate at least one request")
    if not 0 <= args.warmup < 1:
        raise SpecError(f"--warmup {args.warmup:g}: give a fraction in [0, 1)")
    models, gpus = load_models(args.models), load_gpus(args.gpu_catalog)
    wf = load_workflow(_resolve(args.workflow, "workflows"), models)
    plan = load_plan(_resolve(args.plan, "plans"), wf, models, gpus)
    res = simulate(wf, plan.allocation, gpus[plan.gpus.type], models, rate_rps=args.rate,
                   n_requests=args.requests, seed=args.seed, warmup_frac=args.warmup, record_calls=bool(args.trace))
    if args.trace:
        from scepsy_hpc.trace.convert import trace_from_sim
        from scepsy_hpc.trace.records import write_trace

        write_trace(args.trace, trace_from_sim(res, {m: str(r.model) for m, r in wf.llms.items()}))
    if args.json:
        print(json.dumps(_jsonable(res.to_dict()), indent=2))
    else:
        _print_sim(res, plan)
    return 0


def _jsonable(x: Any) -> Any:
    from scepsy_hpc.commands.common import jsonable

    return jsonable(x)


def _print_sim(res: Any, plan: Any) -> None:
    from rich.table import Table

    from scepsy_hpc.commands.common import make_console

    console = make_console()
    table = Table(title=f"{res.workflow}: {res.requests} requests at {res.rate_rps:g} rps on {plan.gpus.count}× {plan.gpus.type}")
    table.add_column("LLM", no_wrap=True)
    for col in ("tp", "frac", "repl", "calls/req", "lat s", "TTFT s", "queue s", "busy"):
        table.add_column(col, justify="right", no_wrap=True)
    for llm, s in res.per_llm.items():
        table.add_row(llm, str(s.tp), f"{s.gpu_frac:g}", str(s.replicas), f"{s.calls_per_request:.1f}",
                      f"{s.latency_mean_s:.2f}", f"{s.ttft_mean_s:.3f}", f"{s.queue_mean_s:.3f}", f"{s.utilisation:.0%}")
    console.print(table)
    ok = res.completed == res.requests
    console.print(
        f"completed {res.completed}/{res.requests}   throughput {res.throughput_rps:.3f} rps   "
        f"latency mean {res.latency_mean_s:.2f} s  p50 {res.latency_p50_s:.2f}  p90 {res.latency_p90_s:.2f}  "
        f"p99 {res.latency_p99_s:.2f} s   (first {res.warmup_frac:.0%} of requests excluded as warm-up)"
    )
    console.print(f"{res.llm_calls} LLM calls simulated in {res.wall_s:.2f} s wall "
                  f"({res.llm_calls / max(res.wall_s, 1e-9):,.0f} calls/s), seed {res.seed}" + ("" if ok else "   [red]some requests did not finish[/red]"))
    if res.requests >= 200 and res.throughput_rps < 0.9 * res.rate_rps:
        console.print(f"[yellow]the plan does not keep up: {res.throughput_rps:.3f} rps served of {res.rate_rps:g} offered[/yellow]")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `scepsy`."""
    ap = argparse.ArgumentParser(prog="scepsy", description="Serve multi-LLM agentic workflows on Slurm GPU clusters.")
    ap.add_argument("--models", metavar="FILE", help="model catalog (default: configs/models.yaml)")
    ap.add_argument("--gpu-catalog", dest="gpu_catalog", metavar="FILE", help="GPU catalog (default: configs/gpus.yaml)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="check workflow, plan, cluster and catalog files")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--json", action="store_true", help="print one JSON object: ok, files (path, kind, ok, problems), problems")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("simulate", help="simulate a workflow served by a plan")
    s.add_argument("workflow", metavar="WORKFLOW", help="workflow file, or the name of a shipped one (e.g. deep_research)")
    s.add_argument("--plan", required=True, help="plan file, or the name of a shipped one (configs/plans/)")
    s.add_argument("--rate", type=float, required=True, metavar="RPS", help="Poisson arrival rate, requests per second")
    s.add_argument("--requests", type=int, default=500, metavar="N", help="number of requests (default 500)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--warmup", type=float, default=0.1, metavar="FRAC",
                   help="fraction of the first requests left out of latency figures (default 0.1)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--trace", metavar="FILE", help="also write the simulated calls as a JSONL trace")
    s.set_defaults(func=cmd_simulate)

    gw = sub.add_parser("gateway", add_help=False,
                        help="run the OpenAI-compatible gateway (routes by model, traces every call); --help for options")
    gw.set_defaults(func=None)
    en = sub.add_parser("engine-sim", add_help=False,
                        help="run a simulated OpenAI-compatible engine server (vLLM flags); --help for options")
    en.set_defaults(func=None)

    tr = sub.add_parser("trace", help="run a workflow through the gateway against local simulated engines; write its trace")
    tr.add_argument("workflow", metavar="WORKFLOW", help="workflow file or shipped name")
    tr.add_argument("--requests", type=int, default=20, metavar="N", help="requests to run (default 20)")
    tr.add_argument("--rate", type=float, metavar="RPS", help="open-loop Poisson arrivals (model time); default closed loop")
    tr.add_argument("--concurrency", type=int, default=4, metavar="C", help="requests in flight without --rate (default 4)")
    tr.add_argument("--driver", choices=("program", "entrypoint"),
                    help="run the spec's program, or its driver.entrypoint (real code); default: entrypoint if the spec has one")
    tr.add_argument("--plan", help="engines per this plan (default: one replica per LLM at the smallest tp that fits)")
    tr.add_argument("--gpu", default="h100-sxm", help="GPU type the simulated engines model without --plan (default h100-sxm)")
    tr.add_argument("--time-scale", type=float, default=0.05, metavar="S",
                    help="wall seconds per model second for engines and tools (default 0.05: 20x faster)")
    tr.add_argument("--id-style", choices=("header", "path"), default="header",
                    help="send the request id as X-Scepsy-Request header or /r/ID/v1 path prefix (program driver)")
    tr.add_argument("-o", "--output", metavar="FILE", help="trace file (default WORKFLOW.trace.jsonl)")
    tr.add_argument("--append", action="store_true", help="append to an existing trace instead of replacing it")
    tr.add_argument("--log-dir", metavar="DIR", help="engine logs (default: a temp dir)")
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=_lazy("trace", "cmd_trace"))

    st = sub.add_parser("stats", help="per-LLM statistics of a trace (n, p, tokens, shares, critical path)")
    st.add_argument("trace", metavar="TRACE", help="JSONL trace (from `scepsy trace`, the gateway or `simulate --trace`)")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=_lazy("trace", "cmd_stats"))

    pr = sub.add_parser("predict", help="predict workflow latency and throughput for a plan at a rate (ALP)")
    pr.add_argument("workflow", metavar="WORKFLOW", help="workflow file or shipped name")
    pr.add_argument("--plan", required=True, help="plan file or shipped name")
    pr.add_argument("--rate", type=float, required=True, metavar="RPS", help="workflow arrival rate, requests per second")
    pr.add_argument("--predictor", choices=("alp-cp", "alp-paper"), default="alp-cp",
                    help="alp-cp (ours: critical path, tools, per-call sizes; default) or alp-paper (Σ L·n/p)")
    pr.add_argument("--trace", metavar="FILE", help="statistics from this trace (default: sample the program unloaded)")
    pr.add_argument("--profiles", metavar="DIR", help="measured profiles (default: synthesise from the performance model)")
    pr.add_argument("--samples", type=int, default=1000, metavar="N", help="program samples without --trace (default 1000)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.set_defaults(func=_lazy("predict", "cmd_predict"))

    pf = sub.add_parser("profile", help="profile each LLM's latency vs. load at several (tp, gpu_frac)")
    pf.add_argument("workflow", metavar="WORKFLOW", help="workflow file or shipped name")
    pf.add_argument("--tp", default="1,2,4", help="tensor-parallel degrees (default 1,2,4)")
    pf.add_argument("--gpu-frac", default="0.25,0.5,1", help="GPU fractions for tp=1 (default 0.25,0.5,1)")
    pf.add_argument("--gpu", default="h100-sxm", help="GPU type of configs/gpus.yaml (default h100-sxm)")
    pf.add_argument("--backend", choices=("synthetic", "local", "slurm"), default="synthetic",
                    help="synthetic: the performance model (default); local: engine servers on this machine, over HTTP; "
                    "slurm: one array job per tp on the cluster, each task holding tp GPUs")
    pf.add_argument("--engine", choices=("sim", "vllm", "sglang"), default="sim",
                    help="engine profiled by the local and slurm backends (default sim; vllm/sglang load dummy weights)")
    pf.add_argument("--cluster", default="local", metavar="CLUSTER.yaml",
                    help="slurm backend: partition, account, QOS, walltime and GRES types (default: the shipped local)")
    pf.add_argument("--partition", help="slurm backend: override the cluster spec's partition")
    pf.add_argument("--time", metavar="WALLTIME", help="slurm backend: walltime per task (default: the cluster spec's)")
    pf.add_argument("--launch-prefix", metavar="CMD", help="put before each engine command (modules, apptainer exec --nv …)")
    pf.add_argument("--llms", help="profile only these LLMs (comma-separated)")
    pf.add_argument("--trace", metavar="FILE", help="replay the calls of this trace (default: sample the program)")
    pf.add_argument("--samples", type=int, default=1000, metavar="N", help="program samples without --trace (default 1000)")
    pf.add_argument("--calls", type=int, default=None, metavar="N",
                    help="calls replayed per rate (default 2000 synthetic, 1200 local: several times max_num_seqs, or an overloaded engine is one batch)")
    pf.add_argument("--time-scale", type=float, default=None, metavar="S",
                    help="local engines run S wall seconds per model second (default: chosen per model)")
    pf.add_argument("--fractions", metavar="F,F,...",
                    help="after finding the capacity, also measure at these fractions of it (default 0.15,...,0.93)")
    pf.add_argument("--start-frac", type=float, default=0.1, metavar="F",
                    help="local backend: start the climb at F x the estimated capacity (default 0.1)")
    pf.add_argument("-o", "--output", metavar="DIR", help="profile directory (default profiles/WORKFLOW-GPU)")
    pf.add_argument("--force", action="store_true", help="re-profile configurations already in DIR")
    pf.add_argument("--log-dir", metavar="DIR", help="where local engines write their logs (default: a temp dir)")
    pf.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    pf.add_argument("--seed", type=int, default=0)
    pf.add_argument("--json", action="store_true", help="print one JSON object")
    pf.set_defaults(func=_lazy("profile", "cmd_profile"))

    pl = sub.add_parser("plan", help="allocate GPUs to a workflow's LLMs: tp, GPU fraction and replicas per LLM")
    pl.add_argument("workflows", nargs="+", metavar="WORKFLOW",
                    help="workflow file(s) or shipped name(s); several share deployments of the same model")
    _budget_args(pl)
    goal = pl.add_mutually_exclusive_group()
    goal.add_argument("--target-rps", metavar="RPS", help="lowest latency at this rate (or WORKFLOW=RPS,...; default: "
                      "each workflow's target)")
    goal.add_argument("--latency-slo", type=float, metavar="S", help="highest rate whose predicted mean latency is ≤ S seconds")
    goal.add_argument("--max-throughput", action="store_true", help="highest rate the GPUs carry, then lowest latency there")
    pl.add_argument("--policy", choices=("milp", "equal", "independent", "paper-enum"), default="milp",
                    help="milp (default), or a baseline: equal split, independent per-LLM, the paper's enumeration")
    pl.add_argument("-o", "--output", metavar="PLAN.yaml", help="write the plan file")
    pl.add_argument("--trace", metavar="FILE", help="statistics from this trace (one workflow; default: sample the program)")
    pl.add_argument("--profiles", metavar="DIR", help="measured profiles (default: synthesise from the performance model)")
    pl.add_argument("--simulate", action="store_true", help="also simulate the plan at its rate and print what it measures")
    pl.add_argument("--plot", metavar="PLACEMENT.png", help="with --cluster: draw the placement (nodes, GPUs coloured by LLM)")
    pl.add_argument("--requests", type=int, default=500, metavar="N", help="requests for --simulate (default 500)")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.set_defaults(func=_lazy("plan", "cmd_plan"))

    to = sub.add_parser("topology", help="show what a topology source says: switches, blocks, nodes, NVLink domains")
    tsub = to.add_subparsers(dest="topology_command", required=True, metavar="SUBCOMMAND")
    ts = tsub.add_parser("show", help="print the topology as a tree (or --json)")
    src = ts.add_mutually_exclusive_group(required=True)
    src.add_argument("--slurm", action="store_true", help="ask the live Slurm (scontrol show topology / node)")
    src.add_argument("--topology-conf", metavar="FILE", help="a topology.conf (tree or block), or topology.yaml (Slurm ≥ 25.05)")
    src.add_argument("--scontrol", metavar="FILE", help="saved `scontrol show topology` output")
    src.add_argument("--nvsmi", metavar="FILE", help="saved `nvidia-smi topo -m` output of one node")
    src.add_argument("--gres", metavar="FILE", help="gres.conf, or `slurmd -G` output (Links= per GPU)")
    src.add_argument("--nvml", action="store_true", help="probe this node's GPUs with NVML (needs nvidia-ml-py)")
    src.add_argument("--cluster", metavar="CLUSTER.yaml", help="a cluster spec's static description")
    ts.add_argument("--partition", metavar="P", help="with --slurm: only this partition's nodes")
    ts.add_argument("--json", action="store_true", help="print one JSON object")
    ts.set_defaults(func=_lazy("topology", "cmd_topology"))

    up = sub.add_parser("up", help="serve a plan (or a workflow, planned first) in one allocation behind the gateway; "
                        "runs in the foreground, Ctrl-C stops it")
    up.add_argument("target", metavar="PLAN|WORKFLOW", help="plan file (with placement), or a workflow to plan on --cluster")
    up.add_argument("--backend", choices=("local", "slurm"), default="local",
                    help="local: processes on this machine (default); slurm: one sbatch job on the cluster")
    up.add_argument("--engine", choices=("sim", "vllm", "sglang"), default="sim", help="engine to start (default sim)")
    up.add_argument("--cluster", default="local", metavar="CLUSTER.yaml",
                    help="cluster spec: Slurm partition/account/qos/walltime and GRES types (default: the shipped local)")
    up.add_argument("--name", help="session name (default: the plan's or workflow's file name)")
    up.add_argument("--partition", help="override the cluster spec's Slurm partition")
    up.add_argument("--account", help="override the cluster spec's Slurm account")
    up.add_argument("--qos", help="override the cluster spec's Slurm QOS")
    up.add_argument("--time", metavar="WALLTIME", help="override the cluster spec's walltime (e.g. 4:00:00)")
    up.add_argument("--switches", type=int, metavar="N", help="at most N leaf switches (default: as many as the placement spans)")
    up.add_argument("--switches-wait", default="5:00", metavar="T", help="how long Slurm may wait for --switches (default 5:00)")
    up.add_argument("--target-rps", type=float, metavar="RPS", help="when planning a workflow: its target rate")
    up.add_argument("--launch-prefix", metavar="CMD",
                    help="put before each engine command, e.g. 'apptainer exec --nv vllm.sif' or 'module load cuda &&'")
    up.add_argument("--engine-arg", action="append", metavar="ARG", help="extra engine argument (repeatable)")
    up.add_argument("--time-scale", type=float, default=1.0, metavar="S",
                    help="sim engine: wall seconds per model second (default 1: real time)")
    up.add_argument("--health-timeout", type=float, metavar="S", help="per engine start-up limit (default sim 120 s, vllm/sglang 1800 s)")
    up.add_argument("--start-timeout", type=float, default=3600.0, metavar="S",
                    help="limit on pending + start-up before giving up (default 3600 s)")
    up.add_argument("--gateway-host", default="127.0.0.1", help="gateway listen address (default 127.0.0.1)")
    up.add_argument("--gateway-port", type=int, default=0, help="gateway port (default: a free one)")
    up.add_argument("--poll", type=float, default=1.0, metavar="S", help="how often the job state is checked (default 1 s)")
    up.add_argument("--state-dir", metavar="DIR", help="sessions directory (default $SCEPSY_STATE_DIR or ~/.scepsy/sessions)")
    up.add_argument("--seed", type=int, default=0)
    up.set_defaults(func=_lazy("serve", "cmd_up"))

    stt = sub.add_parser("status", help="a session's job, engines (node, GPUs, health) and gateway URL; exit 0 when all serve")
    stt.add_argument("name", nargs="?", help="session name (default: the only live one)")
    stt.add_argument("--json", action="store_true", help="print one JSON object")
    stt.add_argument("--state-dir", metavar="DIR")
    stt.set_defaults(func=_lazy("serve", "cmd_status"))

    dn = sub.add_parser("down", help="stop a session: cancel its job, stop its gateway")
    dn.add_argument("name", nargs="?", help="session name (default: the only live one)")
    dn.add_argument("--timeout", type=float, default=90.0, metavar="S", help="wait this long for the job to leave the queue")
    dn.add_argument("--state-dir", metavar="DIR")
    dn.set_defaults(func=_lazy("serve", "cmd_down"))

    dr = sub.add_parser("drive", help="run a workflow's requests through a serving session's gateway (load test)")
    dr.add_argument("name", nargs="?", help="session name (default: the only live one)")
    dr.add_argument("--workflow", help="workflow to sample requests from (default: the session's)")
    dr.add_argument("--gateway", metavar="URL", help="drive this gateway instead of a session's")
    dr.add_argument("--requests", type=int, default=20, metavar="N", help="requests to run (default 20)")
    dr.add_argument("--rate", type=float, metavar="RPS", help="open-loop Poisson arrivals (model time); default closed loop")
    dr.add_argument("--concurrency", type=int, default=4, metavar="C", help="requests in flight without --rate (default 4)")
    dr.add_argument("--time-scale", type=float, default=None, metavar="S", help="tool pacing (default: the session's)")
    dr.add_argument("--prefix", default="d", help="request id prefix (default d)")
    dr.add_argument("--state-dir", metavar="DIR")
    dr.add_argument("--seed", type=int, default=0)
    dr.add_argument("--json", action="store_true", help="print one JSON object")
    dr.set_defaults(func=_lazy("serve", "cmd_drive"))

    be = sub.add_parser("bench", help="simulated throughput and latency of milp vs. the baselines per workflow and GPU count")
    be.add_argument("--workflows", default="rag_rerank,deep_research,coding_agent,mixture_of_agents,beam_search",
                    metavar="W,W,...", help="shipped names or files (default: all shipped)")
    be.add_argument("--gpus", dest="gpu_counts", default="8,16", metavar="N,N,...", help="GPU counts (default 8,16)")
    be.add_argument("--gpu-type", default="h100-sxm", metavar="TYPE", help="GPU type (default h100-sxm)")
    be.add_argument("--max-tp", type=int, default=8, metavar="TP", help="largest tp, the NVLink domain (default 8)")
    be.add_argument("--policies", default="milp,equal,independent,paper-enum", metavar="P,P,...")
    be.add_argument("--requests", type=int, default=1200, metavar="N", help="requests per simulation run (default 1200)")
    be.add_argument("--jobs", type=int, default=0, metavar="J", help="parallel processes (default: CPU count)")
    be.add_argument("--plot", metavar="OUT.png", help="plot mean latency vs. rate per policy (matplotlib)")
    be.add_argument("--json", action="store_true", help="print one JSON object")
    _plan_tuning(be)
    be.set_defaults(func=_lazy("bench", "cmd_bench"))
    return ap


def _budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", dest="gpu_count", type=int, metavar="N", help="GPUs to plan on (with --gpu-type)")
    p.add_argument("--gpu-type", metavar="TYPE", help="GPU type of the catalog (default h100-sxm, or the cluster's)")
    p.add_argument("--cluster", metavar="CLUSTER.yaml", help="plan on a cluster spec's GPUs and place the plan on its nodes "
                   "(NVLink domains cap tp; the placement goes into the plan file)")
    p.add_argument("--max-tp", type=int, default=None, metavar="TP", help="largest tp (default: the NVLink domain, or 8)")
    _plan_tuning(p)


def _plan_tuning(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-util", type=float, default=0.9, metavar="U",
                   help="highest planned utilisation of any LLM (default 0.9: 10%% headroom)")
    p.add_argument("--throughput-tol", type=float, default=0.03, metavar="F",
                   help="--max-throughput (milp): take the lowest-latency allocation whose predicted capacity is "
                        "within F of the most (default 0.03; 0: the most capacity, whatever its latency)")
    p.add_argument("--time-limit", type=float, default=30.0, metavar="S", help="MILP time limit per solve (default 30 s)")
    p.add_argument("--gap", type=float, default=1e-6, metavar="G", help="MILP relative optimality gap (default 1e-6)")
    p.add_argument("--samples", type=int, default=1000, metavar="N", help="program samples per workflow (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-sim-check", dest="sim_check", action="store_false",
                   help="skip the simulator check of the milp plan (its optimum and a shortlist of other allocations "
                        "run in the simulator at the planned rate; the fastest is kept)")
    p.add_argument("--sim-check-throughput", dest="sim_check_throughput", action="store_true",
                   help="with --max-throughput, also race the milp plan against other allocations by simulated "
                        "maximum sustainable rate (minutes on large step-synchronous workflows; off by default)")


PASSTHROUGH = {"gateway": ("scepsy_hpc.gateway.app", "main"), "engine-sim": ("scepsy_hpc.engine.sim_server", "main")}


def _lazy(module: str, name: str) -> Any:
    """A subcommand function imported only when that subcommand runs."""
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"scepsy_hpc.commands.{module}"), name)(args)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `scepsy` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:  # servers with their own option parsers
        import importlib

        module, name = PASSTHROUGH[argv[0]]
        return int(getattr(importlib.import_module(module), name)(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ScepsyError as exc:
        if os.environ.get("SCEPSY_DEBUG") == "1":
            raise
        print(f"error: {exc}" if not isinstance(exc, SpecError) else str(exc), file=sys.stderr)
        if getattr(args, "json", False):  # --json promises one document on stdout, failures included
            print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc),
                                        "exit_code": exc.exit_code}}, indent=2))
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
