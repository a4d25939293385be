"""`scepsy up`, `ls`, `status`, `down`, `events`, `logs`, `drive`: clients of the daemon's control API.

`up` starts the daemon if none runs and asks it for a deployment; without `--detach` it follows the
deployment's events until Ctrl-C, which stops the deployment (as a foreground command would). Every
deployment is served through the one gateway as `NAME/LLM` (or `LLM` where that name is unique), and
under `GATEWAY/d/NAME/v1` by its own LLM names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from scepsy_hpc.commands.argtypes import (non_negative_float, non_negative_int, parser_override, positive_float,
                                         positive_int, request_cap, walltime)
from scepsy_hpc.commands.common import jsonable, make_console
from scepsy_hpc.commands.daemon import add_state_dir

DONE_STATES = ("stopped", "failed")


def add_arguments(sub: Any) -> None:
    """The `up`, `ls`, `status`, `down`, `events`, `logs` and `drive` subcommands' arguments."""
    up = sub.add_parser("up", help="serve a plan (or a workflow, planned first) through the daemon; follows it until "
                        "Ctrl-C (which stops it) unless --detach")
    up.add_argument("target", metavar="PLAN|WORKFLOW", help="plan file (with placement), or a workflow to plan on --cluster")
    up.add_argument("--name", help="deployment name (default: the plan's or workflow's file name)")
    up.add_argument("--detach", action="store_true", help="return once the job is submitted; the daemon keeps it served")
    up.add_argument("--backend", choices=("local", "slurm"), default="local",
                    help="local: processes on this machine (default); slurm: one job on the cluster (submitit)")
    up.add_argument("--engine", choices=("sim", "vllm", "sglang"), default="sim", help="engine to start (default sim)")
    up.add_argument("--cluster", default="local", metavar="CLUSTER.yaml",
                    help="cluster spec: Slurm partition/account/qos/walltime and GRES types (default: the shipped local)")
    up.add_argument("--partition", help="override the cluster spec's Slurm partition")
    up.add_argument("--account", help="override the cluster spec's Slurm account")
    up.add_argument("--qos", help="override the cluster spec's Slurm QOS")
    up.add_argument("--time", type=walltime, metavar="WALLTIME", help="override the cluster spec's walltime (e.g. 4:00:00)")
    up.add_argument("--target-rps", type=positive_float, metavar="RPS", help="when planning a workflow: its target rate")
    up.add_argument("--launch-prefix", metavar="CMD",
                    help="put before each engine command, e.g. 'apptainer exec --nv vllm.sif' or 'module load cuda &&'")
    up.add_argument("--engine-arg", action="append", metavar="ARG", help="extra engine argument (repeatable)")
    for flag, what in (("tool-call-parser", "the engine's tool-call parser"), ("reasoning-parser", "its reasoning parser"),
                       ("chat-template", "its chat template (a path on the nodes, or a name)")):
        up.add_argument(f"--{flag}", action="append", type=parser_override, metavar="[LLM=]NAME",
                        help=f"{what} for LLM (every LLM without LLM=), overriding the plan's and the model catalog's; "
                             "`none` turns it off (repeatable)")
    up.add_argument("--time-scale", type=positive_float, default=1.0, metavar="S",
                    help="sim engine: wall seconds per model second (default 1: real time)")
    up.add_argument("--health-timeout", type=positive_float, metavar="S",
                    help="per engine start-up limit (default sim 120 s, vllm/sglang 1800 s)")
    up.add_argument("--start-timeout", type=positive_float, default=3600.0, metavar="S",
                    help="limit on start-up, counted from the job's start (default 3600 s)")
    up.add_argument("--max-resubmits", type=non_negative_int, default=3, metavar="N",
                    help="a job that ends (scancel, walltime, a lost node) is resubmitted at most N times within "
                         "--resubmit-window, then the deployment fails (default 3; 0: never)")
    up.add_argument("--resubmit-window", type=positive_float, default=1800.0, metavar="S",
                    help="the circuit breaker's window (default 1800 s)")
    up.add_argument("--no-cutover", action="store_true",
                    help="do not replace a job before its walltime ends (it is resubmitted when it ends instead)")
    up.add_argument("--cutover-margin", type=non_negative_float, default=60.0, metavar="S",
                    help="ask for a job's replacement this long before its end, beyond the queue wait and the time to "
                         "healthy engines the daemon measured (default 60 s)")
    up.add_argument("--drain-grace", type=non_negative_float, default=120.0, metavar="S",
                    help="calls in flight on a replaced job's engines (streams included) get this long to finish "
                         "before it is cancelled (default 120 s)")
    up.add_argument("--stall-timeout", type=non_negative_float, default=120.0, metavar="S",
                    help="an engine with calls waiting or running whose token counters have not moved for S seconds "
                         "(although /health answers) is restarted by its node agent (default 120; 0: never)")
    up.add_argument("--max-requests", type=request_cap, metavar="N|plan",
                    help="the gateway lets at most N workflow requests of the deployment be in flight, later ones "
                         "wait; `plan`: the plan's predicted.max_requests (the requests in flight near its predicted "
                         "capacity, written for workflows whose calls continue conversations). Keeps such a "
                         "deployment at its capacity when offered more, where its conversations would otherwise "
                         "thrash its prefix caches; set too low it costs latency (default: no cap)")
    up.add_argument("--seed", type=non_negative_int, default=0)
    up.add_argument("--json", action="store_true", help="print the deployment's status as one JSON object (implies --detach)")
    add_state_dir(up)
    up.set_defaults(run=run)

    ls = sub.add_parser("ls", help="every deployment: state, job, engines healthy, gateway URL")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    add_state_dir(ls)
    ls.set_defaults(run=run)

    stt = sub.add_parser("status", help="a deployment's job, engines (node, GPUs, health) and gateway URL; exit 0 when all serve")
    stt.add_argument("name", nargs="?", help="deployment name (default: every deployment)")
    stt.add_argument("--json", action="store_true", help="print one JSON object")
    stt.add_argument("--watch", action="store_true", help="a live view of every deployment: per LLM rate, latency, queue, "
                     "KV use, replicas healthy (Ctrl-C to leave)")
    stt.add_argument("--interval", type=positive_float, default=2.0, metavar="S", help="--watch refresh (default 2 s)")
    add_state_dir(stt)
    stt.set_defaults(run=run)

    dn = sub.add_parser("down", help="stop a deployment: cancel its job, wait until it left the queue")
    dn.add_argument("name", nargs="?", help="deployment name")
    dn.add_argument("--all", action="store_true", help="stop every deployment")
    dn.add_argument("--timeout", type=positive_float, default=120.0, metavar="S",
                    help="wait this long for the job to leave the queue (default 120 s)")
    dn.add_argument("--no-wait", action="store_true", help="return once the stop is recorded")
    add_state_dir(dn)
    dn.set_defaults(run=run)

    ev = sub.add_parser("events", help="a deployment's events (state changes, jobs, engines), oldest first")
    ev.add_argument("name", nargs="?", help="deployment name (default: every event, the daemon's included)")
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing new events until Ctrl-C")
    ev.add_argument("--json", action="store_true", help="a JSON list of {time, kind, detail, …} (with --follow: one such object per line)")
    ev.add_argument("--limit", type=positive_int, default=1000, metavar="N", help="at most N past events (default 1000)")
    add_state_dir(ev)
    ev.set_defaults(run=run)

    lg = sub.add_parser("logs", help="the end of a deployment's logs (job, agents; or one LLM's engines)")
    lg.add_argument("name", help="deployment name")
    lg.add_argument("--llm", help="only this LLM's engine logs")
    lg.add_argument("--replica", type=non_negative_int, help="only this replica's engine log")
    lg.add_argument("--lines", "-n", type=positive_int, default=100, metavar="N", help="last N lines of each (default 100)")
    add_state_dir(lg)
    lg.set_defaults(run=run)

    dr = sub.add_parser("drive", help="run a workflow's requests through a deployment's gateway (load test)")
    dr.add_argument("name", nargs="?", help="deployment name (default: the only serving one)")
    dr.add_argument("--workflow", help="workflow to drive (default: the deployment's)")
    dr.add_argument("--driver", choices=("program", "entrypoint"), default="program",
                    help="program: sample the spec's program (default); entrypoint: run the workflow's real code "
                         "(driver.entrypoint, e.g. openai-SDK or LangGraph code) with the deployment's base URL")
    dr.add_argument("--gateway", metavar="URL", help="drive this gateway instead of a deployment's (models by LLM name; "
                    "the key from $SCEPSY_API_KEY or $OPENAI_API_KEY)")
    dr.add_argument("--requests", type=positive_int, default=20, metavar="N", help="requests to run (default 20)")
    dr.add_argument("--rate", type=positive_float, metavar="RPS", help="open-loop Poisson arrivals (model time); default closed loop")
    dr.add_argument("--concurrency", type=positive_int, default=4, metavar="C", help="requests in flight without --rate (default 4)")
    dr.add_argument("--time-scale", type=positive_float, default=None, metavar="S", help="tool pacing (default: the deployment's)")
    dr.add_argument("--prefix", default="d", help="request id prefix (default d)")
    dr.add_argument("--seed", type=non_negative_int, default=0)
    dr.add_argument("--json", action="store_true", help="print one JSON object")
    add_state_dir(dr)
    dr.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the command."""
    return {"up": cmd_up, "ls": cmd_ls, "status": cmd_status, "down": cmd_down, "events": cmd_events,
            "logs": cmd_logs, "drive": cmd_drive}[args.command](args)


def _client(args: argparse.Namespace) -> Any:
    from scepsy_hpc.service.client import DaemonClient
    from scepsy_hpc.service.paths import StatePaths

    return DaemonClient(StatePaths.of(args.state_dir))


def _absolute(value: str | None) -> str | None:
    """A path the daemon can open from its own directory (names of shipped files stay as they are)."""
    if value is None:
        return None
    p = Path(value)
    return str(p.resolve()) if p.exists() or p.suffix in (".yaml", ".yml") else value


_FLAGS = {"cutover_margin_s": "--cutover-margin", "drain_grace_s": "--drain-grace", "stall_timeout_s": "--stall-timeout",
          "resubmit_window_s": "--resubmit-window", "start_timeout_s": "--start-timeout",
          "health_timeout_s": "--health-timeout", "time_scale": "--time-scale", "target_rps": "--target-rps"}


def _up_request(**fields: Any) -> Any:
    """The UpRequest of `up`'s arguments; a value out of range is a SpecError naming its flag."""
    from pydantic import ValidationError

    from scepsy_hpc.errors import SpecError
    from scepsy_hpc.service.deploy import UpRequest

    try:
        return UpRequest(**fields)
    except ValidationError as exc:
        raise SpecError([f"up {_FLAGS.get(str(e['loc'][0]), '--' + str(e['loc'][0]).replace('_', '-'))} "
                         f"{e.get('input')!r}: {e['msg']}" for e in exc.errors()]) from None


def _parsers(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """--tool-call-parser / --reasoning-parser / --chat-template as LLM (or *) → field → name."""
    out: dict[str, dict[str, str]] = {}
    for field in ("tool_call_parser", "reasoning_parser", "chat_template"):
        for llm, name in getattr(args, field) or ():
            out.setdefault(llm, {})[field] = name
    return out


def cmd_up(args: argparse.Namespace) -> int:
    """Ask the daemon (started if needed) for the deployment, then follow it unless detached."""
    from scepsy_hpc.backend.base import check_name
    from scepsy_hpc.service.launch import start_daemon

    client = _client(args)
    name = check_name(args.name or Path(args.target).stem, "deployment name")
    req = _up_request(name=name, target=_absolute(args.target) or args.target, backend=args.backend, engine=args.engine,
                    cluster=_absolute(args.cluster) or "local", partition=args.partition, account=args.account, qos=args.qos,
                    time=args.time, target_rps=args.target_rps, max_requests=args.max_requests,
                    launch_prefix=args.launch_prefix or "", engine_args=list(args.engine_arg or ()),
                    time_scale=args.time_scale, health_timeout_s=args.health_timeout, start_timeout_s=args.start_timeout,
                    seed=args.seed, models=_absolute(args.models), gpu_catalog=_absolute(args.gpu_catalog),
                    max_resubmits=args.max_resubmits, resubmit_window_s=args.resubmit_window,
                    cutover=not args.no_cutover, cutover_margin_s=args.cutover_margin, drain_grace_s=args.drain_grace,
                    stall_timeout_s=args.stall_timeout, parsers=_parsers(args))
    start_daemon(client.paths, reuse=True)
    since = _last_seq(client)
    doc = client.request("POST", "/v1/deployments", req.model_dump(), timeout_s=900.0)
    err = make_console(stderr=True)
    if args.json:
        print(json.dumps(jsonable(doc), indent=2))
        return 0
    err.print(f"deployment {name}: job {doc['job_id']} submitted ({args.backend}); daemon {doc['daemon_pid']}")
    if args.detach:
        print(f"{name}: {doc['state']}; gateway {doc['base_url']}; `scepsy status {name}`, `scepsy events {name} -f`, "
              f"`scepsy down {name}`")
        print(_key_hint(name, doc['base_url'], args.state_dir))
        return 0
    return _follow_up(client, name, since, err)


def _key_hint(name: str, base_url: str | None, state_dir: str | None) -> str:
    """How to call the deployment: its owner key (made by the daemon at `up`) and base URL; run with
    `scepsy --remote HOST` (which sets $SCEPSY_REMOTE_CLIENT), through a tunnel from the workstation."""
    where = f" --state-dir {state_dir}" if state_dir else ""
    host = os.environ.get("SCEPSY_REMOTE_CLIENT")
    if host and base_url:
        from urllib.parse import urlsplit

        path = urlsplit(base_url).path
        return (f"  from your workstation: scepsy --remote {host} tunnel {name} --local-port 8000, then "
                f"export OPENAI_API_KEY=$(scepsy --remote {host} keys show {name}{where}) "
                f"OPENAI_BASE_URL=http://127.0.0.1:8000{path}")
    return (f"  every call needs its key: export OPENAI_API_KEY=$(scepsy keys show {name}{where}) "
            f"OPENAI_BASE_URL={base_url}")


def _last_seq(client: Any) -> int:
    return int(client.request("GET", "/v1/daemon").get("last_event_seq", 0))


def _follow_up(client: Any, name: str, since: int, err: Any) -> int:
    """Print the deployment's events until it fails or is stopped elsewhere; Ctrl-C stops it."""
    from scepsy_hpc.service.client import DaemonNotRunning

    served = False
    try:
        while True:
            got = client.request("GET", "/v1/events", query={"deployment": name, "after": since, "wait": 10},
                                 timeout_s=40.0)
            for e in got["events"]:
                err.print(f"{_when(e['ts'])} {e['message']}", soft_wrap=True, highlight=False, markup=False)
            since = got["last"]
            doc = client.request("GET", f"/v1/deployments/{name}")
            if doc["state"] == "serving" and not served:
                served = True
                print(f"serving {name}: {doc['base_url']} (models: {', '.join(sorted({i['llm'] for i in doc['instances']}))}); "
                      f"`scepsy status {name}`, `scepsy down {name}`; Ctrl-C stops it", flush=True)
                print(_key_hint(name, doc["base_url"], str(client.paths.root)), flush=True)
            if doc["state"] == "failed":
                err.print(f"{name} failed: {doc['error']}", style="red", soft_wrap=True, highlight=False, markup=False)
                return 1
            if doc["state"] == "stopped":
                err.print(f"{name} was stopped")
                return 0
    except DaemonNotRunning:
        err.print(f"the scepsy daemon stopped; {name} keeps serving (its job, engines and the gateway run on): "
                  f"`scepsy daemon start` adopts it, `scepsy events {name} -f` follows it again", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print(f"interrupted: stopping {name}")
        client.request("DELETE", f"/v1/deployments/{name}")
        _wait_done(client, [name], 120.0)
        err.print(f"{name} stopped")
        return 130


def _when(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _wait_done(client: Any, names: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """Until each deployment is stopped or failed (its job out of the queue); their last status."""
    from scepsy_hpc.errors import ScepsyError

    deadline = time.monotonic() + timeout_s
    while True:
        docs = [client.request("GET", f"/v1/deployments/{n}") for n in names]
        if all(d["state"] in DONE_STATES for d in docs):
            return docs
        if time.monotonic() > deadline:
            left = ", ".join(f"{d['name']} ({d['state']}, job {d['job_id']} {d['job_state']})" for d in docs
                             if d["state"] not in DONE_STATES)
            raise ScepsyError(f"still not stopped after {timeout_s:g} s: {left}; the daemon keeps trying; "
                              f"`scepsy events NAME` shows why")
        time.sleep(0.2)


def cmd_ls(args: argparse.Namespace) -> int:
    """Every deployment, one line each."""
    doc = _client(args).request("GET", "/v1/deployments")
    if args.json:
        print(json.dumps(jsonable(doc), indent=2))
        return 0
    from rich.table import Table

    t = Table()
    for col in ("NAME", "STATE", "BACKEND", "JOB", "ENGINES", "GATEWAY"):
        t.add_column(col, no_wrap=True)
    for d in doc["deployments"]:
        healthy = sum(1 for i in d["instances"] if i["healthy"])
        t.add_row(d["name"], _state(d["state"]), d["backend"] or "-", f"{d['job_id'] or '-'} {d['job_state'] or ''}",
                  f"{healthy}/{len(d['instances'])}", d["base_url"] or "-")
    make_console().print(t if doc["deployments"] else "no deployments: `scepsy up PLAN|WORKFLOW` starts one")
    return 0


def _state(state: str) -> str:
    colour = {"serving": "green", "degraded": "yellow", "failed": "red", "starting": "cyan", "pending": "cyan"}.get(state)
    return f"[{colour}]{state}[/{colour}]" if colour else state


def cmd_status(args: argparse.Namespace) -> int:
    """One deployment's (or every deployment's) status; exit 0 only when everything shown serves."""
    client = _client(args)
    if args.watch:
        from scepsy_hpc.service.view import watch

        return watch(client, args.interval)
    docs = ([client.request("GET", f"/v1/deployments/{args.name}")] if args.name
            else client.request("GET", "/v1/deployments")["deployments"])
    ok = bool(docs) and all(d["state"] == "serving" and all(i["healthy"] for i in d["instances"] if i["routed"])
                            for d in docs)
    if args.json:
        print(json.dumps(jsonable(docs[0] if args.name else {"deployments": docs}), indent=2))
        return 0 if ok else 1
    from rich.table import Table

    c = make_console()
    if not docs:
        c.print("no deployments: `scepsy up PLAN|WORKFLOW` starts one")
    for s in docs:
        live = [j for j in s.get("jobs", []) if j["ended"] is None]
        jobs = ", ".join(f"{j['job_id']} on {j['nodes'] or j['unit']} {j['state']}" + (" draining" if j["drain_started"]
                         else "") for j in live) or "-"
        c.print(f"[bold]{s['name']}[/bold]: {_state(s['state'])}   jobs ({s['backend']}): {jobs}")
        c.print(f"  gateway {s['base_url'] or '-'}" + (f"\n  [red]{s['error']}[/red]" if s.get("error") else ""))
        cont = s.get("continuity") or {}
        if cont.get("capacity"):
            c.print("  capacity " + ", ".join(f"{k} {v['now']}/{v['plan']}" for k, v in cont["capacity"].items())
                    + " (engines taking calls / planned)")
        if cont.get("next_cutover"):
            c.print(f"  next cut-over {_when(cont['next_cutover'])} (walltime ends {_when(cont['walltime_end'])}; lead "
                    f"{cont['lead_s']:.0f} s = queue {cont['queue_wait_s']:.0f} + healthy {cont['time_to_healthy_s']:.0f} "
                    f"+ margin {cont['margin_s']:.0f})")
        if cont.get("excluded_nodes"):
            c.print("  excluded nodes: " + "; ".join(f"{n} ({why})" for n, why in cont["excluded_nodes"].items()))
        t = Table()
        for col in ("LLM", "replica", "job", "node", "GPUs", "URL", "pid", "health"):
            t.add_column(col, no_wrap=True)
        for i in s["instances"]:
            health = ("[green]serving[/green]" if i["routed"] else "[yellow]healthy, drained[/yellow]") if i["healthy"] \
                else f"[red]{i['state'] or 'down'}[/red]"
            t.add_row(i["llm"], str(i["replica"]), i["job_id"], i["node"], ",".join(map(str, i["gpus"])), i["url"],
                      str(i["pid"] or "-"), health)
        if s["instances"]:
            c.print(t)
    return 0 if ok else 1


def cmd_down(args: argparse.Namespace) -> int:
    """Stop one deployment (or all) and wait until each job has left the queue."""
    from scepsy_hpc.errors import SpecError

    client = _client(args)
    if args.all == bool(args.name):
        raise SpecError("down: name one deployment, or give --all")
    if args.all:
        names = [d["name"] for d in client.request("GET", "/v1/deployments")["deployments"] if d["state"] not in DONE_STATES]
    else:
        names = [args.name]
    for n in names:
        client.request("DELETE", f"/v1/deployments/{n}")
    if args.no_wait:
        print(f"stopping {', '.join(names) or 'nothing'}")
        return 0
    docs = _wait_done(client, names, args.timeout)
    for d in docs:
        print(f"{d['name']} is {d['state']}: job {d['job_id'] or '-'} is no longer queued or running")
    if not docs:
        print("no deployment was running")
    return 0


def _event_json(e: dict[str, Any]) -> dict[str, Any]:
    """One event as `events --json` prints it: when (ISO 8601, with the UTC offset), what kind, the detail (why),
    and the event's data."""
    import datetime as dt

    when = dt.datetime.fromtimestamp(e["ts"]).astimezone().isoformat(timespec="milliseconds")
    return {"time": when, "ts": e["ts"], "seq": e["seq"], "deployment": e["deployment"], "kind": e["kind"],
            "detail": e["message"], "data": e.get("data") or {}}


def cmd_events(args: argparse.Namespace) -> int:
    """Past events, then (with --follow) new ones as they come."""
    client = _client(args)
    q: dict[str, Any] = {"deployment": args.name, "after": 0, "limit": args.limit}
    got = client.request("GET", "/v1/events", query=q)
    if args.json and not args.follow:
        print(json.dumps([_event_json(e) for e in got["events"]], indent=2))
        return 0
    c = make_console()

    def show(events: list[dict[str, Any]]) -> None:
        for e in events:
            if args.json:
                print(json.dumps(_event_json(e)), flush=True)
            else:
                c.print(f"{_when(e['ts'])} {e['deployment'] or 'daemon'} {e['kind']}: {e['message']}", highlight=False,
                        markup=False, soft_wrap=True)

    show(got["events"])
    if not args.follow:
        return 0
    try:
        while True:
            got = client.request("GET", "/v1/events", query={**q, "after": got["last"], "wait": 20}, timeout_s=60.0)
            show(got["events"])
    except KeyboardInterrupt:
        return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """The end of each log."""
    got = _client(args).request("GET", f"/v1/deployments/{args.name}/logs",
                                query={"llm": args.llm, "replica": args.replica, "lines": args.lines})
    for entry in got["logs"]:
        print(f"==> {entry['path']} <==")
        print(entry["text"])
    if not got["logs"]:
        print(f"no logs yet for {args.name}", file=sys.stderr)
    return 0


def cmd_drive(args: argparse.Namespace) -> int:
    """Run a workflow's requests through a deployment's gateway (or any gateway URL)."""
    import asyncio  # here, not at the top: `scepsy --help` builds this module's parsers
    import os

    from scepsy_hpc.drive.entrypoint import drive_entrypoint
    from scepsy_hpc.drive.synthetic import drive_program
    from scepsy_hpc.errors import SpecError
    from scepsy_hpc.spec.catalog import load_models, resolve_input
    from scepsy_hpc.spec.workflow import load_workflow

    url, scale, wf_arg, prefix, files = args.gateway, args.time_scale, args.workflow, "", []
    name = None
    # a gateway given by URL: the key from the environment; a deployment's: its owner key, from the daemon
    api_key = os.environ.get("SCEPSY_API_KEY") or os.environ.get("OPENAI_API_KEY") or None
    if url is None:
        client = _client(args)
        doc = _deployment_to_drive(client, args.name)
        name, url = doc["name"], doc["gateway_url"]
        api_key = client.request("GET", f"/v1/deployments/{name}/owner-key")["secret"]
        scale = scale or doc.get("time_scale") or 1.0
        wfs, files = doc.get("workflows") or [], doc.get("spec_paths") or []
        wf_arg = wf_arg or (wfs[0] if len(wfs) == 1 else None)
        if wf_arg is None:
            raise SpecError(f"deployment {name!r} serves {', '.join(wfs)}: give --workflow")
        prefix = f"{name}/" + (f"{wf_arg}/" if len(wfs) > 1 else "")
    if not wf_arg:
        raise SpecError("give the workflow to drive (--workflow)")
    models = load_models(args.models)
    path = next((Path(f) for f in files if Path(f).exists() and Path(f).suffix in (".yaml", ".yml")
                 and _workflow_name(f) == wf_arg), None) or resolve_input(wf_arg, "workflows")
    wf = load_workflow(path, models)
    if args.driver == "entrypoint":
        # the real code names its LLMs as the workflow does: /d/NAME scopes them to the deployment
        os.environ["SCEPSY_TIME_SCALE"] = str(scale or 1.0)   # the examples pace their tools alike
        if api_key:
            os.environ["SCEPSY_API_KEY"] = api_key             # … and call the gateway with this key
        base = f"{url}/d/{name}" if name else url
        res = asyncio.run(drive_entrypoint(wf, path.parent, base, n_requests=args.requests, rate_rps=args.rate,
                                           concurrency=args.concurrency, seed=args.seed, time_scale=scale or 1.0,
                                           request_prefix=args.prefix, api_key=api_key))
    else:
        res = asyncio.run(drive_program(wf, url, n_requests=args.requests, rate_rps=args.rate,
                                        concurrency=None if args.rate else args.concurrency, seed=args.seed,
                                        time_scale=scale or 1.0, request_prefix=args.prefix, model_prefix=prefix,
                                        api_key=api_key))
    lat = sorted(r.latency_s for r in res.requests.values() if r.status == "ok")
    summary = {"gateway_url": url, "workflow": wf.name, "driver": args.driver, "requests": len(res.requests),
               "ok": res.n_ok, "errors": res.n_error, "duration_s": res.duration_s,
               "latency_mean_s": sum(lat) / len(lat) if lat else None,
               "latency_p50_s": lat[len(lat) // 2] if lat else None,
               "latency_p90_s": lat[min(len(lat) - 1, int(0.9 * len(lat)))] if lat else None,
               "throughput_rps": res.n_ok / res.duration_s if res.duration_s > 0 else None,
               "first_errors": res.errors()[:5]}
    if args.json:
        print(json.dumps(jsonable(summary), indent=2))
    else:
        print(res.summary())
        for e in res.errors()[:5]:
            print(f"  {e}")
    return 0 if res.n_ok == len(res.requests) else 1


def _workflow_name(path: str) -> str | None:
    """The `name:` of a workflow file (None when it is not one)."""
    from scepsy_hpc.errors import ScepsyError
    from scepsy_hpc.spec.source import load_yaml

    try:
        data, _ = load_yaml(path)
    except (ScepsyError, OSError):   # an unreadable file is simply not the workflow asked for
        return None
    return data.get("name") if isinstance(data, dict) and "program" in data else None


def _deployment_to_drive(client: Any, name: str | None) -> dict[str, Any]:
    """The named deployment, or the only one serving; it must be serving."""
    from scepsy_hpc.errors import SpecError

    if name:
        doc = client.request("GET", f"/v1/deployments/{name}")
    else:
        serving = [d for d in client.request("GET", "/v1/deployments")["deployments"] if d["state"] == "serving"]
        if len(serving) != 1:
            raise SpecError(f"{len(serving)} deployments are serving ({', '.join(d['name'] for d in serving) or 'none'}): "
                            f"name one")
        doc = serving[0]
    if doc["state"] not in ("serving", "degraded") or not doc["gateway_url"]:
        raise SpecError(f"deployment {doc['name']!r} is {doc['state']}, not serving: nothing to drive")
    return dict(doc)
