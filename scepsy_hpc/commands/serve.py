"""`scepsy up`, `scepsy status`, `scepsy down`: serve a plan in one allocation, behind the gateway.

`up` runs in the foreground: it submits one job for the plan's placement (a node agent per node
starts the engines on their GPUs), waits until every engine answers /health, serves the gateway on
this host and watches the job. Ctrl-C (or `scepsy down` from another shell) cancels the job; a job
that ends by itself (scancel from outside, walltime, a node failure) ends `up` within seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scepsy_hpc.commands.argtypes import non_negative_int, port, positive_float, positive_int, walltime
from scepsy_hpc.commands.common import jsonable, make_console, resolve_input
from scepsy_hpc.errors import ScepsyError, SpecError

if TYPE_CHECKING:
    from scepsy_hpc.backend.base import ClusterBackend
    from scepsy_hpc.backend.records import ServeConfig
    from scepsy_hpc.backend.session import Session
    from scepsy_hpc.spec.placement_entry import PlacementEntry


def add_arguments(sub: Any) -> None:
    """The `up`, `status`, `down` and `drive` subcommands' arguments."""
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
    up.add_argument("--time", type=walltime, metavar="WALLTIME", help="override the cluster spec's walltime (e.g. 4:00:00)")
    up.add_argument("--switches", type=positive_int, metavar="N",
                    help="at most N leaf switches (default: as many as the placement spans)")
    up.add_argument("--switches-wait", type=walltime, default="5:00", metavar="T",
                    help="how long Slurm may wait for --switches (default 5:00)")
    up.add_argument("--target-rps", type=positive_float, metavar="RPS", help="when planning a workflow: its target rate")
    up.add_argument("--launch-prefix", metavar="CMD",
                    help="put before each engine command, e.g. 'apptainer exec --nv vllm.sif' or 'module load cuda &&'")
    up.add_argument("--engine-arg", action="append", metavar="ARG", help="extra engine argument (repeatable)")
    up.add_argument("--time-scale", type=positive_float, default=1.0, metavar="S",
                    help="sim engine: wall seconds per model second (default 1: real time)")
    up.add_argument("--health-timeout", type=positive_float, metavar="S",
                    help="per engine start-up limit (default sim 120 s, vllm/sglang 1800 s)")
    up.add_argument("--start-timeout", type=positive_float, default=3600.0, metavar="S",
                    help="limit on pending + start-up before giving up (default 3600 s)")
    up.add_argument("--gateway-host", default="127.0.0.1", help="gateway listen address (default 127.0.0.1)")
    up.add_argument("--gateway-port", type=port, default=0, help="gateway port (default: a free one)")
    up.add_argument("--poll", type=positive_float, default=1.0, metavar="S", help="how often the job state is checked (default 1 s)")
    up.add_argument("--state-dir", metavar="DIR", help="sessions directory (default $SCEPSY_STATE_DIR or ~/.scepsy/sessions)")
    up.add_argument("--seed", type=non_negative_int, default=0)
    up.set_defaults(run=run)

    stt = sub.add_parser("status", help="a session's job, engines (node, GPUs, health) and gateway URL; exit 0 when all serve")
    stt.add_argument("name", nargs="?", help="session name (default: the only live one)")
    stt.add_argument("--json", action="store_true", help="print one JSON object")
    stt.add_argument("--state-dir", metavar="DIR")
    stt.set_defaults(run=run)

    dn = sub.add_parser("down", help="stop a session: cancel its job, stop its gateway")
    dn.add_argument("name", nargs="?", help="session name (default: the only live one)")
    dn.add_argument("--timeout", type=positive_float, default=90.0, metavar="S",
                    help="wait this long for the job to leave the queue")
    dn.add_argument("--state-dir", metavar="DIR")
    dn.set_defaults(run=run)

    dr = sub.add_parser("drive", help="run a workflow's requests through a serving session's gateway (load test)")
    dr.add_argument("name", nargs="?", help="session name (default: the only live one)")
    dr.add_argument("--workflow", help="workflow to sample requests from (default: the session's)")
    dr.add_argument("--gateway", metavar="URL", help="drive this gateway instead of a session's")
    dr.add_argument("--requests", type=positive_int, default=20, metavar="N", help="requests to run (default 20)")
    dr.add_argument("--rate", type=positive_float, metavar="RPS", help="open-loop Poisson arrivals (model time); default closed loop")
    dr.add_argument("--concurrency", type=positive_int, default=4, metavar="C", help="requests in flight without --rate (default 4)")
    dr.add_argument("--time-scale", type=positive_float, default=None, metavar="S", help="tool pacing (default: the session's)")
    dr.add_argument("--prefix", default="d", help="request id prefix (default d)")
    dr.add_argument("--state-dir", metavar="DIR")
    dr.add_argument("--seed", type=non_negative_int, default=0)
    dr.add_argument("--json", action="store_true", help="print one JSON object")
    dr.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """`scepsy up`, `status`, `down` or `drive`."""
    return {"up": cmd_up, "status": cmd_status, "down": cmd_down, "drive": cmd_drive}[args.command](args)


def _load_inputs(args: argparse.Namespace, session: Any, models: Any, gpus: Any, cluster: Any) -> tuple[Any, Any, Path]:
    """(plan, workflow, plan path): the plan given, or one planned now (planning.plan) for the
    workflow given, on `cluster`, with `scepsy plan`'s defaults."""
    from scepsy_hpc.spec.plan import load_plan
    from scepsy_hpc.spec.source import load_yaml
    from scepsy_hpc.spec.workflow import load_workflow

    path = Path(args.target)
    if not path.exists():
        for kind in ("plans", "workflows"):
            try:
                path = resolve_input(args.target, kind)
                break
            except SpecError:
                continue
        else:
            raise SpecError(f"{args.target}: no such plan or workflow file, and no shipped one of that name")
    data, _ = load_yaml(path)
    if isinstance(data, dict) and "allocation" in data:
        prov = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
        src = prov.get("workflow_file")
        wf_path = Path(src) if isinstance(src, str) and Path(src).exists() else resolve_input(str(data.get("workflow")), "workflows")
        wf = load_workflow(wf_path, models)
        return load_plan(path, wf, models, gpus), wf, path
    wf = load_workflow(path, models)
    from scepsy_hpc.commands.plan import show
    from scepsy_hpc.planning import PlanRequest, plan

    plan_path = session.dir / "plan.yaml"
    same = ["plan", str(path), "--cluster", args.cluster, "-o", str(plan_path)]
    if args.target_rps:
        same += ["--target-rps", str(args.target_rps)]
    err = make_console(stderr=True)
    err.print(f"[dim]planning {wf.name} on {args.cluster}: scepsy {' '.join(same)}[/dim]")
    request = PlanRequest(workflows=(wf,), models=models, gpus=gpus, cluster=cluster, cluster_ref=args.cluster,
                          target_rps={wf.name: args.target_rps} if args.target_rps else {},
                          workflow_files=(str(path.resolve()),))
    result = plan(request, progress=(lambda m: err.print(f"[dim]{m}[/dim]")) if sys.stderr.isatty() else None)
    show(result, output=str(plan_path))
    return load_plan(plan_path, wf, models, gpus), wf, plan_path


def _placement(plan: Any, cluster: Any, gpus: Any) -> list[PlacementEntry]:
    """The plan's placement, or one made now on the cluster spec's nodes."""
    if plan.placement:
        return list(plan.placement)
    from scepsy_hpc.place.placement import place
    from scepsy_hpc.topology.build import from_cluster

    if not cluster.node_groups:
        raise SpecError("the plan has no placement: plan it with `scepsy plan --cluster CLUSTER` (or give a cluster spec "
                        "with node_groups to place it on)")
    return place(plan.allocation, from_cluster(cluster, gpus), gpu_type=plan.gpus.type).entries()


def cmd_up(args: argparse.Namespace) -> int:
    """Submit, wait for healthy engines, serve the gateway, watch the job."""
    import asyncio  # here, not at the top: `scepsy --help` builds this module's parsers
    from scepsy_hpc.backend.base import NodeJob
    from scepsy_hpc.backend.serving import claim_session, make_backend, placement_nodes, serve_config, write_serve_files
    from scepsy_hpc.backend.session import open_session, state_root
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.cluster import load_cluster

    models, gpus = load_models(args.models), load_gpus(args.gpu_catalog)
    root = state_root(args.state_dir)
    name = args.name or Path(args.target).stem
    session = open_session(name, root)
    backend = make_backend(args.backend, root)
    claim_session(session, backend)
    cluster = load_cluster(resolve_input(args.cluster, "clusters"), gpus)
    plan, wf, plan_path = _load_inputs(args, session, models, gpus, cluster)
    placement = _placement(plan, cluster, gpus)
    config = serve_config(plan, wf, models, gpus, placement, engine=args.engine,
                          engine_args=tuple(args.engine_arg or ()), launch_prefix=args.launch_prefix or "",
                          health_timeout_s=args.health_timeout, time_scale=args.time_scale, seed=args.seed)
    slurm = cluster.slurm
    partition = backend.preflight(args.partition or (slurm.partition if slurm else None), placement)
    write_serve_files(session, config, plan_path)
    per_node = placement_nodes(placement)
    gres_type = next((k for k, v in (slurm.gpu_types if slurm else {}).items() if v == plan.gpus.type), None)
    job = NodeJob(name=f"scepsy-{name}", nodes=tuple(sorted(per_node)),
                  command=(sys.executable, "-m", "scepsy_hpc.backend.agent", "--session", str(session.dir)),
                  gpus_per_node=max(len(g) for g in per_node.values()), log_dir=session.log_dir, workdir=Path.cwd(),
                  partition=partition, account=args.account or (slurm.account if slurm else None),
                  qos=args.qos or (slurm.qos if slurm else None), time=args.time or (slurm.time if slurm else None),
                  constraint=slurm.constraint if slurm else None, switches=args.switches or _leaves(placement, cluster, gpus),
                  switches_wait=args.switches_wait, gres_type=gres_type,
                  env={"PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                                 os.environ.get("PYTHONPATH")) if p)})
    err = make_console(stderr=True)
    job_id = backend.submit(job)
    session.update(name=name, backend=args.backend, job_id=job_id, state="starting", engine=args.engine,
                   up_pid=os.getpid(), plan=str(session.dir / "plan.yaml"), workflow=wf.name, gateway_url=None,
                   script=str(backend.script_path(job)), created=time.time(), time_scale=args.time_scale)
    err.print(f"submitted job {job_id} ({args.backend}): {len(config.instances)} engine(s) on {', '.join(job.nodes)}; "
              f"script {backend.script_path(job)}")
    try:
        return asyncio.run(_serve(args, session, backend, job_id, config, err))
    except BaseException as exc:
        backend.cancel_and_wait(job_id)
        session.update(state="failed" if isinstance(exc, ScepsyError) else "down", error=str(exc))
        if isinstance(exc, KeyboardInterrupt):
            err.print(f"interrupted: job {job_id} cancelled")
            return 130
        raise


def _leaves(placement: list[Any], cluster: Any, gpus: Any) -> int | None:
    """Leaf switches the placement spans (for --switches), when the cluster spec knows its switches."""
    if not cluster.node_groups:
        return None
    from scepsy_hpc.topology.build import from_cluster

    topo = from_cluster(cluster, gpus)
    leaves = {topo.node(p.node).leaf for p in placement if p.node in {n.name for n in topo.nodes}}
    return len(leaves) if leaves and None not in leaves else None


async def _serve(args: argparse.Namespace, session: Session, backend: ClusterBackend, job_id: str, config: ServeConfig,
                 err: Any) -> int:
    import asyncio  # here, not at the top: `scepsy --help` builds this module's parsers
    from scepsy_hpc.gateway.app import start_gateway

    await _wait_ready(session, backend, job_id, config, args.start_timeout, err)
    eps = session.endpoints_path
    _write_endpoints(session, eps, args.time_scale if args.engine == "sim" else None)
    gw = await start_gateway(eps, session.dir / "trace.jsonl", host=args.gateway_host, port=args.gateway_port)
    url = f"http://{args.gateway_host}:{gw.port}"
    session.update(state="serving", gateway_url=url)
    print(f"serving {session.name}: gateway {url}/v1 (job {job_id}); `scepsy status {session.name}`, "
          f"`scepsy down {session.name}`", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    rc = 0
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=args.poll)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                break
            st = await asyncio.to_thread(backend.status, job_id)
            if not st.active:
                err.print(f"[red]job {job_id} ended: {st.state}{' (' + st.reason + ')' if st.reason else ''}; "
                          f"the engines are gone; logs in {session.log_dir}[/red]")
                session.update(state="ended", job_state=st.state, error=f"job ended: {st.state} {st.reason}".strip())
                rc = 1
                break
            _write_endpoints(session, eps, args.time_scale if args.engine == "sim" else None)
    finally:
        await gw.close()
    if rc == 0:
        await asyncio.to_thread(backend.cancel_and_wait, job_id)
        session.update(state="down")
        err.print(f"job {job_id} cancelled; session {session.name} is down")
    return rc


def _write_endpoints(session: Session, path: Path, time_scale: float | None) -> None:
    """endpoints.yaml from the agents' reports, rewritten only when it changes (the gateway reloads it)."""
    from scepsy_hpc.gateway.endpoints import endpoints_from_agents, write_endpoints

    write_endpoints(path, endpoints_from_agents(session.agents(), time_scale))


async def _wait_ready(session: Session, backend: ClusterBackend, job_id: str, config: ServeConfig, timeout_s: float,
                      err: Any) -> None:
    """Until every node agent reports ready; EngineError naming the log of an engine that failed."""
    from scepsy_hpc.backend.serving import wait_ready

    await wait_ready(session, backend, job_id, config, timeout_s, lambda line: err.print(f"[dim]{line}[/dim]"))


def cmd_status(args: argparse.Namespace) -> int:
    """Print the session's job, engines and gateway; exit 0 only when everything serves."""
    from scepsy_hpc.backend.serving import make_backend, session_status
    from scepsy_hpc.backend.session import find_session, state_root

    root = state_root(args.state_dir)
    session = find_session(args.name, root)
    s = session_status(session, make_backend(session.info().backend, root))
    ok = s["state"] == "serving" and s["gateway_healthy"] and bool(s["instances"]) and all(i["healthy"] for i in s["instances"])
    if args.json:
        print(json.dumps(jsonable(s), indent=2))
        return 0 if ok else 1
    from rich.table import Table

    c = make_console()
    c.print(f"session {s['name']}: {s['state']}   job {s['job_id']} ({s['backend']}) {s.get('job_state', '?')}"
            + (f" {s['job_reason']}" if s.get("job_reason") else ""))
    c.print(f"gateway {s['gateway_url'] or '-'} " + ("[green]healthy[/green]" if s["gateway_healthy"] else "[red]not answering[/red]"))
    t = Table()
    for col in ("LLM", "replica", "node", "GPUs", "CUDA_VISIBLE_DEVICES", "URL", "health"):
        t.add_column(col, no_wrap=True)
    for i in s["instances"]:
        t.add_row(i["llm"], str(i["replica"]), i["node"], ",".join(map(str, i["gpus"])), i["cuda_visible_devices"], i["url"],
                  "[green]healthy[/green]" if i["healthy"] else f"[red]{i['state'] or 'down'}[/red]")
    c.print(t)
    if s.get("error"):
        c.print(f"[red]{s['error']}[/red]")
    return 0 if ok else 1


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the `up` process (it cancels its job) and make sure the job has left the queue."""
    from scepsy_hpc.backend.serving import make_backend, take_down
    from scepsy_hpc.backend.session import find_session, state_root

    root = state_root(args.state_dir)
    session = find_session(args.name, root)
    job_id = take_down(session, make_backend(session.info().backend, root), args.timeout)
    print(f"session {session.name} is down: job {job_id} is no longer queued or running")
    return 0


def cmd_drive(args: argparse.Namespace) -> int:
    """Run a workflow's requests through a serving session's gateway (or any gateway URL)."""
    import asyncio  # here, not at the top: `scepsy --help` builds this module's parsers
    from scepsy_hpc.backend.session import find_session, state_root
    from scepsy_hpc.drive.synthetic import drive_program
    from scepsy_hpc.spec.catalog import load_models
    from scepsy_hpc.spec.workflow import load_workflow

    url, scale, wf_arg = args.gateway, args.time_scale, args.workflow
    if url is None:
        info = find_session(args.name, state_root(args.state_dir)).info()
        if info.state != "serving" or not info.gateway_url:
            raise SpecError(f"session {info.name!r} is {info.state}, not serving: nothing to drive")
        url = info.gateway_url
        scale = scale or info.time_scale or 1.0
        wf_arg = wf_arg or info.workflow
    if not wf_arg:
        raise SpecError("give the workflow to drive (--workflow)")
    wf = load_workflow(resolve_input(wf_arg, "workflows"), load_models(args.models))
    res = asyncio.run(drive_program(wf, url, n_requests=args.requests, rate_rps=args.rate,
                                    concurrency=None if args.rate else args.concurrency, seed=args.seed,
                                    time_scale=scale or 1.0, request_prefix=args.prefix))
    summary = {"gateway_url": url, "requests": len(res.requests), "ok": res.n_ok, "errors": res.n_error,
               "first_errors": res.errors()[:5]}
    if args.json:
        print(json.dumps(jsonable(summary), indent=2))
    else:
        print(res.summary())
        for e in res.errors()[:5]:
            print(f"  {e}")
    return 0 if res.n_ok == len(res.requests) else 1
