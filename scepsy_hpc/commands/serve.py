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
from typing import Any

from scepsy_hpc.commands.argtypes import non_negative_int, port, positive_float, positive_int, walltime
from scepsy_hpc.commands.common import jsonable, make_console, resolve_input
from scepsy_hpc.errors import EngineError, InfeasibleError, ScepsyError, SlurmError, SpecError

HEALTH_TIMEOUT_S = {"sim": 120.0, "vllm": 1800.0, "sglang": 1800.0}


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


def make_backend(kind: str, root: Path) -> Any:
    """The ClusterBackend called `kind`."""
    if kind == "slurm":
        from scepsy_hpc.backend.slurm import SlurmBackend

        return SlurmBackend()
    from scepsy_hpc.backend.local import LocalBackend

    return LocalBackend(root / ".local-jobs")


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


def _placement(plan: Any, cluster: Any, gpus: Any) -> list[dict[str, Any]]:
    """The plan's placement, or one made now on the cluster spec's nodes."""
    if plan.placement:
        return list(plan.placement)
    from scepsy_hpc.place.placement import place
    from scepsy_hpc.topology.build import from_cluster

    if not cluster.node_groups:
        raise SpecError("the plan has no placement: plan it with `scepsy plan --cluster CLUSTER` (or give a cluster spec "
                        "with node_groups to place it on)")
    return place(plan.allocation, from_cluster(cluster, gpus), gpu_type=plan.gpus.type).as_list()


def serve_config(plan: Any, wf: Any, models: Any, placement: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """serve.json: every engine of the placement with its launch fields."""
    from scepsy_hpc.engine.adapters import EngineLaunch, check_launch, parse_prefix
    from scepsy_hpc.perf.model import EngineConfig
    from scepsy_hpc.spec.workflow import resolve_model

    instances = []
    extra = tuple(args.engine_arg or ())
    for p in placement:
        llm, alloc = p["llm"], plan.allocation[p["llm"]]
        ref = wf.llms[llm].model
        if args.engine == "sim" and not isinstance(ref, str):
            raise SpecError(f"LLM {llm!r} has an inline model; the sim engine needs a model of the catalog by name")
        model = resolve_model(wf, llm, models)
        seqs = alloc.max_num_seqs or EngineConfig(model, args.gpus_catalog[plan.gpus.type], tp=alloc.tp,
                                                  gpu_frac=alloc.gpu_frac).max_num_seqs
        launch = EngineLaunch(engine=args.engine, model=ref if isinstance(ref, str) else model.hf_id, hf_id=model.hf_id,
                              served_name=llm, gpu=plan.gpus.type, tp=alloc.tp, gpu_frac=alloc.gpu_frac,
                              mem_frac=float(p.get("mem_frac", 0.9 * alloc.gpu_frac)), max_num_seqs=int(seqs),
                              port=int(p.get("port", 8100)), time_scale=args.time_scale, seed=args.seed, extra_args=extra)
        check_launch(launch)
        instances.append({"llm": llm, "replica": int(p["replica"]), "node": str(p["node"]), "gpus": list(p["gpus"]),
                          "gpu_frac": alloc.gpu_frac, "mps_pct": int(p.get("mps_pct", round(100 * alloc.gpu_frac))),
                          "port": launch.port, "launch": {k: getattr(launch, k) for k in launch.__dataclass_fields__}})
    return {"engine": args.engine, "launch_prefix": parse_prefix(args.launch_prefix or ""),
            "health_timeout_s": args.health_timeout or HEALTH_TIMEOUT_S[args.engine], "instances": instances}


def preflight(backend: Any, partition: str | None, placement: list[dict[str, Any]]) -> str:
    """Check the partition and the placement against the live Slurm before anything is submitted; the partition used."""
    from scepsy_hpc.topology.discover import discover

    parts = backend.partitions()
    if partition is None:
        partition = next((p.name for p in parts.values() if p.default), None)
        if partition is None:
            raise SlurmError("Slurm has no default partition: set slurm.partition in the cluster spec or pass --partition")
    if partition not in parts:
        raise SlurmError(f"partition {partition!r} does not exist on this cluster (it has {', '.join(sorted(parts)) or 'none'}); "
                         f"fix slurm.partition in the cluster spec or pass --partition; nothing was submitted")
    _, nodes = discover(backend.run, partition)
    by_name = {n.name: n for n in nodes}
    used = {(p["node"], g) for p in placement for g in p["gpus"]}
    have = sum(n.gpus for n in nodes)
    if len(used) > have:
        raise InfeasibleError(f"the plan needs {len(used)} GPUs; partition {partition!r} has {have} ({len(nodes)} node(s)); "
                              f"nothing was submitted: re-plan with `scepsy plan --cluster` for this partition")
    for node in sorted({p["node"] for p in placement}):
        n = by_name.get(node)
        if n is None:
            raise SpecError(f"the placement uses node {node!r}, which partition {partition!r} does not have "
                            f"({', '.join(sorted(by_name)) or 'no nodes'}); re-plan with `scepsy plan --cluster`; nothing was submitted")
        top = max((g for nn, g in used if nn == node), default=-1)
        if top >= n.gpus:
            raise SpecError(f"the placement uses GPU {top} of node {node!r}, which has {n.gpus} GPU(s); re-plan; nothing was submitted")
        if not n.usable:
            raise SlurmError(f"node {node!r} is {n.state}: re-plan without it (`scepsy plan --cluster` skips such nodes); "
                             f"nothing was submitted")
    return partition


def cmd_up(args: argparse.Namespace) -> int:
    """Submit, wait for healthy engines, serve the gateway, watch the job."""
    import asyncio  # here, not at the top: `scepsy --help` builds this module's parsers
    from scepsy_hpc.backend.base import NodeJob
    from scepsy_hpc.backend.session import open_session, state_root
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.cluster import load_cluster

    models, gpus = load_models(args.models), load_gpus(args.gpu_catalog)
    args.gpus_catalog = gpus
    root = state_root(args.state_dir)
    name = args.name or Path(args.target).stem
    session = open_session(name, root)
    backend = make_backend(args.backend, root)
    prev = session.info()
    if prev.get("job_id") and prev.get("state") in ("starting", "serving"):
        try:
            alive = backend.status(prev["job_id"]).active
        except ScepsyError:
            alive = False
        if alive:
            raise SpecError(f"session {name!r} is already up (job {prev['job_id']}); `scepsy down {name}` first, or --name another")
    session.dir.mkdir(parents=True, exist_ok=True)
    for stale in list((session.dir / "agents").glob("*.json")) + [session.dir / "endpoints.yaml"]:
        stale.unlink(missing_ok=True)
    cluster = load_cluster(resolve_input(args.cluster, "clusters"), gpus)
    plan, wf, plan_path = _load_inputs(args, session, models, gpus, cluster)
    placement = _placement(plan, cluster, gpus)
    config = serve_config(plan, wf, models, placement, args)
    slurm = cluster.slurm
    partition = args.partition or (slurm.partition if slurm else None)
    if args.backend == "slurm":
        partition = preflight(backend, partition, placement)
    (session.dir / "serve.json").write_text(json.dumps(config, indent=1))
    if plan_path.resolve() != (session.dir / "plan.yaml").resolve():
        (session.dir / "plan.yaml").write_text(plan_path.read_text())
    per_node: dict[str, set[int]] = {}
    for p in placement:
        per_node.setdefault(p["node"], set()).update(p["gpus"])
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
    err.print(f"submitted job {job_id} ({args.backend}): {len(config['instances'])} engine(s) on {', '.join(job.nodes)}; "
              f"script {backend.script_path(job)}")
    try:
        return asyncio.run(_serve(args, session, backend, job_id, config, err))
    except BaseException as exc:
        _cancel_and_wait(backend, job_id)
        session.update(state="failed" if isinstance(exc, ScepsyError) else "down", error=str(exc))
        if isinstance(exc, KeyboardInterrupt):
            err.print(f"interrupted: job {job_id} cancelled")
            return 130
        raise


def _leaves(placement: list[dict[str, Any]], cluster: Any, gpus: Any) -> int | None:
    """Leaf switches the placement spans (for --switches), when the cluster spec knows its switches."""
    if not cluster.node_groups:
        return None
    from scepsy_hpc.topology.build import from_cluster

    topo = from_cluster(cluster, gpus)
    leaves = {topo.node(p["node"]).leaf for p in placement if p["node"] in {n.name for n in topo.nodes}}
    return len(leaves) if leaves and None not in leaves else None


async def _serve(args: argparse.Namespace, session: Any, backend: Any, job_id: str, config: dict[str, Any], err: Any) -> int:
    import asyncio  # here, not at the top: `scepsy --help` builds this module's parsers
    from scepsy_hpc.gateway.app import start_gateway

    await _wait_ready(session, backend, job_id, config, args.start_timeout, err)
    eps = session.dir / "endpoints.yaml"
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
        await asyncio.to_thread(_cancel_and_wait, backend, job_id)
        session.update(state="down")
        err.print(f"job {job_id} cancelled; session {session.name} is down")
    return rc


def _write_endpoints(session: Any, path: Path, time_scale: float | None) -> None:
    """endpoints.yaml from the agents' reports, rewritten only when it changes (the gateway reloads it)."""
    import yaml

    from scepsy_hpc.backend.session import endpoints_from_agents

    text = yaml.safe_dump(endpoints_from_agents(session.agents(), time_scale), sort_keys=True)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


async def _wait_ready(session: Any, backend: Any, job_id: str, config: dict[str, Any], timeout_s: float, err: Any) -> None:
    """Until every node agent reports ready; EngineError naming the log of an engine that failed."""
    import asyncio  # here, not at the top: `scepsy --help` builds this module's parsers
    nodes = sorted({i["node"] for i in config["instances"]})
    deadline = time.monotonic() + timeout_s
    said = ""
    while True:
        agents = session.agents()
        failed = [a for a in agents.values() if a.get("state") == "failed"]
        if failed:
            raise EngineError(f"node {failed[0]['node']}: {failed[0].get('error') or 'the agent failed'}")
        if all(agents.get(n, {}).get("state") == "ready" for n in nodes):
            return
        st = await asyncio.to_thread(backend.status, job_id)
        if not st.active:
            out = session.log_dir / f"job-{job_id}.out"
            raise SlurmError(f"job {job_id} ended ({st.state}{', ' + st.reason if st.reason else ''}) before its engines were "
                             f"healthy; see {out if out.exists() else session.log_dir}")
        healthy = sum(1 for a in agents.values() for i in a.get("instances", []) if i.get("healthy"))
        now = f"job {job_id} {st.state}{' (' + st.reason + ')' if st.reason and st.state == 'PENDING' else ''}: " \
              f"{healthy}/{len(config['instances'])} engine(s) healthy"
        if now != said:
            err.print(f"[dim]{now}[/dim]")
            said = now
        if time.monotonic() > deadline:
            raise EngineError(f"not every engine was healthy after {timeout_s:g} s ({now}); engine logs in {session.log_dir}")
        await asyncio.sleep(0.5)


def _cancel_and_wait(backend: Any, job_id: str, timeout_s: float = 90.0) -> bool:
    """Cancel and wait until the job has left the queue; whether it did in time."""
    try:
        backend.cancel(job_id)
    except ScepsyError:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if not backend.in_queue(job_id):
                return True
        except ScepsyError:
            return True
        time.sleep(0.5)
    return False


def _healthy(url: str | None) -> bool:
    from scepsy_hpc.engine.local import is_healthy

    return is_healthy(url, timeout_s=2.0)


def session_status(session: Any, backend: Any) -> dict[str, Any]:
    """The session as `status --json` prints it."""
    info = session.info()
    job_id = info.get("job_id")
    job: dict[str, Any] = {}
    if job_id:
        try:
            st = backend.status(job_id)
            job = {"job_state": st.state, "job_reason": st.reason, "job_nodes": st.nodes}
        except ScepsyError as exc:
            job = {"job_state": "ERROR", "job_reason": str(exc)}
    instances = []
    for node, report in session.agents().items():
        for i in report.get("instances", []):
            instances.append({"llm": i["llm"], "replica": i["replica"], "node": node, "gpus": i["gpus"],
                              "cuda_visible_devices": i.get("cuda_visible_devices", ""), "url": i.get("url", ""),
                              "state": i.get("state", ""), "healthy": bool(i.get("healthy")) and _healthy(i.get("url")),
                              "pid": i.get("pid"), "log": i.get("log", ""), "error": i.get("error", "")})
    instances.sort(key=lambda i: (i["llm"], i["replica"]))
    gw = info.get("gateway_url")
    return {"name": session.name, "state": info.get("state"), "backend": info.get("backend"), "job_id": job_id, **job,
            "gateway_url": gw, "gateway_healthy": _healthy(gw), "workflow": info.get("workflow"), "engine": info.get("engine"),
            "instances": instances, "session_dir": str(session.dir), "script": info.get("script"), "error": info.get("error")}


def cmd_status(args: argparse.Namespace) -> int:
    """Print the session's job, engines and gateway; exit 0 only when everything serves."""
    from scepsy_hpc.backend.session import find_session, state_root

    root = state_root(args.state_dir)
    session = find_session(args.name, root)
    s = session_status(session, make_backend(session.info().get("backend", "local"), root))
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
    from scepsy_hpc.backend.session import find_session, state_root

    root = state_root(args.state_dir)
    session = find_session(args.name, root)
    info = session.info()
    backend = make_backend(info.get("backend", "local"), root)
    pid = info.get("up_pid")
    if pid and pid != os.getpid() and _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    job_id = info.get("job_id")
    gone = _cancel_and_wait(backend, job_id, args.timeout) if job_id else True
    session.update(state="down")
    if not gone:
        raise SlurmError(f"job {job_id} is still in the queue {args.timeout:g} s after scancel; check `squeue -j {job_id}`")
    print(f"session {session.name} is down: job {job_id} is no longer queued or running")
    return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # /proc says whether it is a zombie
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


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
        if info.get("state") != "serving" or not info.get("gateway_url"):
            raise SpecError(f"session {info.get('name')!r} is {info.get('state')}, not serving: nothing to drive")
        url = info["gateway_url"]
        scale = scale or info.get("time_scale") or 1.0
        wf_arg = wf_arg or info.get("workflow")
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
