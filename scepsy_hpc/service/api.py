"""The control API: HTTP/JSON on the daemon's unix socket (mode 0600; each connection's peer uid is checked).

    GET    /v1/daemon                          pid, uptime, version, socket, backends, deployments, Slurm calls/min
    POST   /v1/daemon/stop        {all}        stop the daemon (with all: every deployment and the gateway first)
    GET    /v1/deployments                     every deployment's status
    POST   /v1/deployments        UpRequest    plan, place, submit; the new deployment's status
    GET    /v1/deployments/NAME                one deployment's status
    DELETE /v1/deployments/NAME                stop it (the job is cancelled; state goes stopping → stopped)
    GET    /v1/deployments/NAME/logs?llm=&replica=&lines=   the tails of its logs
    GET    /v1/events?deployment=&after=&wait=&limit=       events after seq `after` (long-poll up to `wait` s)
    GET    /v1/watch                           status plus per-LLM traffic (gateway) and engine load (/metrics)
    GET    /v1/keys?deployment=                every client key (never the key nor its hash)
    POST   /v1/keys  {deployment, label, max_concurrent, rpm}   a new key: its row and, this once, the key
    DELETE /v1/keys/ID                         revoke it (the endpoints file is rewritten at once)
    GET    /v1/deployments/NAME/owner-key      the owner key made at `up` (from NAME's owner.key)

An error is `{"error": {type, message, exit_code}}` with status 400 (bad input), 404 (unknown deployment or key),
409, or 500; the client raises it again as the same ScepsyError.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError

from scepsy_hpc import __version__
from scepsy_hpc.errors import ScepsyError, SpecError, error_document
from scepsy_hpc.service.deploy import UpRequest
from scepsy_hpc.service.keys import ClientKeyError, key_doc

if TYPE_CHECKING:
    from scepsy_hpc.service.daemon import Daemon
    from scepsy_hpc.service.state import Deployment

MAX_BODY_BYTES = 1024 * 1024
MAX_LOG_LINES = 5000
MAX_WAIT_S = 30.0
_DAEMON: web.AppKey["Daemon"] = web.AppKey("daemon")


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process at the other end of the unix socket (SO_PEERCRED), None where unknown."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _error(exc: ScepsyError, status: int) -> web.Response:
    return web.json_response(error_document(exc), status=status)


@web.middleware
async def _guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    uid = peer_uid(request)
    if uid is not None and uid != os.getuid():
        return _error(ScepsyError(f"uid {uid} may not use the scepsy daemon of uid {os.getuid()}"), 403)
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except SpecError as exc:
        return _error(exc, 404 if "no deployment" in str(exc) else 400)
    except ClientKeyError as exc:
        return _error(exc, 404 if str(exc).startswith("no key") else 409)
    except ScepsyError as exc:
        return _error(exc, 409)


def daemon_doc(daemon: Daemon) -> dict[str, Any]:
    """`scepsy daemon status --json`."""
    deps = daemon.store.deployments()
    return {"pid": os.getpid(), "uptime_s": round(time.time() - daemon.started, 1), "version": __version__,
            "state_dir": str(daemon.paths.root), "socket": str(daemon.paths.socket), "log": str(daemon.paths.log),
            "backend": sorted({j.backend for j in daemon.store.jobs(live_only=True)}) or ["local"],
            "deployments": len(deps), "serving": sum(1 for d in deps if d.state == "serving"),
            "slurm_calls_last_minute": daemon.slurm_calls(60.0), "poll_s": daemon.poll_s, "cycles": daemon.cycles,
            "last_cycle_s": round(daemon.last_cycle_s, 4), "last_event_seq": daemon.store.last_event_seq(),
            "gateway": {"url": daemon.gateway.url, "pid": daemon.gateway.pid, "alive": daemon.gateway.alive(),
                        "trace": str(daemon.gateway.current_trace()) if daemon.gateway.current_trace() else None}}


def continuity_doc(daemon: Daemon, d: Deployment, jobs: list[Any], rows: list[Any]) -> dict[str, Any]:
    """The capacity now against the plan, and when the next cut-over starts (with its lead's parts)."""
    from scepsy_hpc.service.units import llms_of

    shape = daemon.live[d.name].shape if d.name in daemon.live else None
    plan = llms_of(shape) if shape is not None else {}
    capacity = {llm: {"now": sum(1 for r in rows if r.llm == llm and r.routed), "plan": n} for llm, n in plan.items()}
    lead = daemon.lead(d)
    live = [j for j in jobs if j.ended is None]
    replaced = {j.replaces for j in live if j.replaces}
    ends = [j.walltime_end for j in live if j.walltime_end is not None and j.drain_started is None
            and j.job_id not in replaced]
    opts = d.options or {}
    return {"capacity": capacity, "walltime_end": min(ends) if ends else None,
            "next_cutover": (min(ends) - lead.total_s) if ends and opts.get("cutover", True) else None,
            "lead_s": round(lead.total_s, 3), "queue_wait_s": round(lead.queue_s, 3),
            "time_to_healthy_s": round(lead.healthy_s, 3), "margin_s": lead.margin_s,
            "drain_grace_s": opts.get("drain_grace_s"), "excluded_nodes": opts.get("excluded_nodes") or {},
            "resubmits": len(opts.get("resubmits") or []), "max_resubmits": opts.get("max_resubmits")}


def deployment_doc(daemon: Daemon, d: Deployment) -> dict[str, Any]:
    """`scepsy status NAME --json`."""
    jobs = daemon.store.jobs(d.name)
    rows = daemon.store.instances(d.name)
    job = jobs[-1] if jobs else None
    gw = daemon.gateway.url
    opts = d.options or {}
    return {
        "name": d.name, "state": d.state, "desired": d.desired, "backend": opts.get("backend"),
        "engine": opts.get("engine"), "job_id": job.job_id if job else None, "job_ids": [j.job_id for j in jobs],
        "job_state": job.state if job else None, "job_reason": job.reason if job else None,
        "job_nodes": job.nodes if job else None, "walltime_end": job.walltime_end if job else None,
        "gateway_url": gw, "base_url": f"{gw}/d/{d.name}/v1" if gw else None,
        "jobs": [{"job_id": j.job_id, "name": j.name, "unit": j.unit, "nodes": j.nodes, "state": j.state,
                  "reason": j.reason, "role": j.role, "replaces": j.replaces or None, "walltime_end": j.walltime_end,
                  "started": j.started, "drain_started": j.drain_started, "ended": j.ended} for j in jobs],
        "instances": [{"llm": r.llm, "replica": r.replica, "job_id": r.job_id, "node": r.node, "gpus": r.gpus,
                       "url": r.url, "healthy": r.healthy, "routed": r.routed, "state": r.state, "pid": r.pid,
                       "restarts": r.restarts, "error": r.error} for r in rows],
        "continuity": continuity_doc(daemon, d, jobs, rows),
        "daemon_pid": os.getpid(), "workflows": opts.get("workflows", []), "target": d.target, "plan": d.plan_path,
        "spec_paths": d.spec_paths,
        "session_dir": d.session_dir, "time_scale": opts.get("time_scale"), "error": d.error,
        "created": d.created, "updated": d.updated,
    }


async def _body(request: web.Request) -> Any:
    if request.content_length and request.content_length > MAX_BODY_BYTES:
        raise SpecError(f"request body of {request.content_length} bytes is larger than {MAX_BODY_BYTES}")
    try:
        return await request.json() if request.can_read_body else {}
    except ValueError:
        raise SpecError("the request body is not JSON") from None


def _int(request: web.Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SpecError(f"{key}={raw!r}: give a whole number") from None
    return max(lo, min(hi, value))


async def _get_daemon(request: web.Request) -> web.Response:
    return web.json_response(daemon_doc(request.app[_DAEMON]))


async def _stop_daemon(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    body = await _body(request)
    daemon.request_stop(everything=bool(isinstance(body, dict) and body.get("all")))
    return web.json_response({"stopping": True, "pid": os.getpid(), "all": daemon.stop_all})


async def _list(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    return web.json_response({"deployments": [deployment_doc(daemon, d) for d in daemon.store.deployments()],
                              "daemon_pid": os.getpid()})


async def _up(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    try:
        req = UpRequest.model_validate(await _body(request))
    except ValidationError as exc:
        raise SpecError([f"up: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
    d = await daemon.up(req)
    return web.json_response(deployment_doc(daemon, d), status=201)


async def _get(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    return web.json_response(deployment_doc(daemon, daemon.require(request.match_info["name"])))


async def _down(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    return web.json_response(deployment_doc(daemon, daemon.down(request.match_info["name"])))


async def _events(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    name = request.query.get("deployment") or None
    if name:
        daemon.require(name)
    after = _int(request, "after", 0, 0, 2**62)
    limit = _int(request, "limit", 1000, 1, 10_000)
    wait_s = min(float(_int(request, "wait", 0, 0, int(MAX_WAIT_S))), MAX_WAIT_S)
    deadline = time.monotonic() + wait_s
    events = daemon.store.events(name, after=after, limit=limit)
    while not events and time.monotonic() < deadline and not daemon.stopping:
        await daemon.wait_event(min(1.0, deadline - time.monotonic()))
        events = daemon.store.events(name, after=after, limit=limit)
    return web.json_response({"events": [{"seq": e.seq, "ts": e.ts, "deployment": e.deployment, "kind": e.kind,
                                          "message": e.message, "data": e.data} for e in events],
                              "last": events[-1].seq if events else after})


def _tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a file, reading at most its last 1 MiB."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 1024 * 1024))
            data = f.read()
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _job_logs(daemon: Daemon, name: str) -> list[Path]:
    """The output of each node's task of the deployment's Slurm jobs, found through submitit's handle on the job
    (re-attached by id, as after a daemon restart)."""
    from scepsy_hpc.backend.slurm import SlurmBackend
    from scepsy_hpc.backend.templates import submitit_folder
    from scepsy_hpc.spec.hostlist import expand_hostlist

    out: list[Path] = []
    for j in daemon.store.jobs(name):
        backend = daemon.backend(j.backend)
        if not isinstance(backend, SlurmBackend) or not j.folder:
            continue
        try:
            nodes = max(1, len(expand_hostlist(j.nodes)))
        except ValueError:
            nodes = 1
        handle = backend.reattach(j.job_id, submitit_folder(Path(j.folder)), nodes=nodes)
        for task in range(nodes):
            paths = handle.task(task).paths if nodes > 1 else handle.paths
            out += [p for p in (paths.stdout, paths.stderr) if p.exists()]
    return out


async def _logs(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    d = daemon.require(request.match_info["name"])
    llm = request.query.get("llm") or None
    replica = _int(request, "replica", -1, -1, 1_000_000)
    lines = _int(request, "lines", 100, 1, MAX_LOG_LINES)
    jobs = daemon.store.jobs(d.name)
    log_dirs = {j.job_id: Path(j.session_dir or d.session_dir) / "logs" for j in jobs}
    files: list[Path]
    if llm is not None or replica >= 0:
        rows = [r for r in daemon.store.instances(d.name) if (llm is None or r.llm == llm) and (replica < 0 or r.replica == replica)]
        if not rows:
            have = sorted({f"{r.llm}·{r.replica}" for r in daemon.store.instances(d.name)})
            raise SpecError(f"deployment {d.name!r} has no instance {llm or '*'}·{replica if replica >= 0 else '*'}; "
                            f"it has {', '.join(have) or 'none yet'}")
        files = [log_dirs.get(r.job_id, Path(d.session_dir) / "logs") / f"engine-{r.llm}-{r.replica}.log" for r in rows]
    else:
        files = sorted(p for ld in dict.fromkeys(log_dirs.values()) for p in ld.glob("*")
                       if p.is_file() and p.suffix in (".out", ".log", ".err"))
        files = await asyncio.to_thread(_job_logs, daemon, d.name) + files
    out = await asyncio.to_thread(lambda: [{"path": str(p), "text": _tail(p, lines)} for p in files])
    return web.json_response({"deployment": d.name, "logs": out})


async def _watch(request: web.Request) -> web.Response:
    from scepsy_hpc.service.watch import collect

    daemon = request.app[_DAEMON]
    return web.json_response(await collect(daemon))


async def _keys(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    name = request.query.get("deployment") or None
    if name:
        daemon.require(name)
    return web.json_response({"keys": [key_doc(r) for r in daemon.store.keys(name)]})


def _opt_int(body: dict[str, Any], key: str, flag: str) -> int | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SpecError(f"{flag} {value!r}: give a whole number ≥ 1 (or leave it out for no limit)")
    return value


async def _create_key(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    body = await _body(request)
    if not isinstance(body, dict) or not isinstance(body.get("deployment"), str):
        raise SpecError("POST /v1/keys: give {\"deployment\": NAME, \"label\", \"max_concurrent\", \"rpm\"}")
    d = daemon.require(body["deployment"])
    label = body.get("label") or ""
    if not isinstance(label, str):
        raise SpecError(f"--label {label!r}: give text")
    row, key = daemon.keys.create(d.name, label=label, max_concurrent=_opt_int(body, "max_concurrent", "--max-concurrent"),
                                  rpm=_opt_int(body, "rpm", "--rpm"))
    daemon.write_endpoints()
    await daemon.reload_gateway()   # the key works from the client's first call
    daemon.event(d.name, "key", f"key {row.id} created" + (f" ({label})" if label else ""), key_id=row.id)
    return web.json_response({"key": key_doc(row), "secret": key}, status=201)


async def _revoke_key(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    row = daemon.keys.revoke(request.match_info["key_id"])
    daemon.write_endpoints()
    await daemon.reload_gateway()   # refused from the next call on, once this answers
    daemon.event(row.deployment, "key", f"key {row.id} revoked", key_id=row.id)
    return web.json_response({"key": key_doc(row)})


async def _owner_key(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    d = daemon.require(request.match_info["name"])
    row, key = await asyncio.to_thread(daemon.keys.owner, d.name, d.session_dir)
    gw = daemon.gateway.url
    return web.json_response({"key": key_doc(row), "secret": key, "base_url": f"{gw}/d/{d.name}/v1" if gw else None})


def make_app(daemon: Daemon) -> web.Application:
    """The API's aiohttp application."""
    app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY_BYTES)
    app[_DAEMON] = daemon
    app.router.add_get("/v1/daemon", _get_daemon)
    app.router.add_post("/v1/daemon/stop", _stop_daemon)
    app.router.add_get("/v1/deployments", _list)
    app.router.add_post("/v1/deployments", _up)
    app.router.add_get("/v1/deployments/{name}", _get)
    app.router.add_delete("/v1/deployments/{name}", _down)
    app.router.add_get("/v1/deployments/{name}/logs", _logs)
    app.router.add_get("/v1/events", _events)
    app.router.add_get("/v1/watch", _watch)
    app.router.add_get("/v1/keys", _keys)
    app.router.add_post("/v1/keys", _create_key)
    app.router.add_delete("/v1/keys/{key_id}", _revoke_key)
    app.router.add_get("/v1/deployments/{name}/owner-key", _owner_key)
    return app
