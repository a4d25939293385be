"""The login-node daemon: owns the desired state, talks to Slurm, supervises the gateway, answers the CLI.

    python -m scepsy_hpc.service.daemon [--state-dir D] [--poll S] [--gateway-host H] [--gateway-port P]

(`scepsy daemon start` runs this detached; `--foreground` in the same process.) One daemon per state
dir, held by a lock. Three kinds of process, so that no single failure stops traffic: this daemon
(control plane), the gateway (data plane, its own process), and the jobs' node agents and engines.

**Jobs.** A deployment is served by one job per node of its plan (a *unit*: service/units.py), so
that a node can be replaced alone; each job has its own session directory (serve.json, agents/,
logs/) under the deployment's.

**Reconcile loop**, every `poll_s` (1 s while only local deployments live, 10 s with Slurm ones, 5 s
with none; 1 s while a deployment starts or stops, its backend still polled at its own period):
1. *Jobs*: one `poll()` per backend in use, whatever the number of deployments (on Slurm one
   `squeue --me`, plus one batched `sacct` for jobs that left the queue). A job is ours only if id,
   name (it carries a nonce) and submit time all match; a recycled id is an event, never adopted.
   A job that ended is recorded with the backend's state and reason; one requeued by Slurm is
   cancelled and counted as ended (its engines are gone).
2. *Instances*: each live job's agents' reports, an agent's liveness (its pid on this host, else its
   heartbeat), and one GET /health per engine (at most 16 at once). An engine is *routed* (in the
   gateway's endpoints file) when healthy and its job is not drained; a job whose agent got the
   walltime or preemption signal is drained when its end is near or it was preempted.
3. *Units*: a unit no live job serves gets a job: lost (walltime, scancel, NODE_FAIL — its node is
   excluded —, preemption, an engine failed past its restarts after the deployment served) behind
   the circuit breaker (`max_resubmits` within `resubmit_window_s`), or the second half of a
   cut-over without room. Before a deployment first served, a failure fails it instead.
4. *Cut-overs*: a job whose end is within the lead (queue wait observed on this backend and
   partition + time to healthy measured for this deployment + `cutover_margin_s`), that was
   preempted, or that runs on an excluded node, gets a replacement on a free node; once all its
   engines take calls the old job is drained (out of the routes, in-flight calls finish within
   `drain_grace_s`, read from the gateway's `draining` stats) and cancelled. When no node has room
   for the replacement, nodes go one at a time: drain, cancel, then the replacement on its node.
5. *State*: serving when every LLM has its planned engines routed (and the gateway loaded the
   routes), degraded below that after it served, starting before; stopping → stopped; failed.
6. *Routes* and *gateway*: the endpoints file rewritten on change; the gateway restarted if it died.

Every transition is written to the state database before it is acted on, so a daemon killed at any
point restarts into a state that names every job it submitted; a new daemon adopts what still runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fcntl
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from scepsy_hpc import __version__
from scepsy_hpc.backend.agent import reap_engines, report_stale
from scepsy_hpc.backend.base import FINAL, ClusterBackend, JobRef, JobStatus, owned
from scepsy_hpc.backend.records import AgentReport, ServeConfig
from scepsy_hpc.backend.session import Session
from scepsy_hpc.engine.supervisor import pid_alive
from scepsy_hpc.errors import ScepsyError, SlurmError, SpecError, run_entry
from scepsy_hpc.service.deploy import JobTemplate, UpRequest, job_name, prepare
from scepsy_hpc.service.units import (DEFAULT_HEALTHY_S, DEFAULT_QUEUE_S, Lead, choose_node, gpus_needed, llms_of,
                                      part_dir, unit_config, units)
from scepsy_hpc.service.gateway_proc import GatewayProcess
from scepsy_hpc.service.paths import StatePaths, check_owned
from scepsy_hpc.service.state import Deployment, InstanceRow, Job, StateStore

log = logging.getLogger("scepsy_hpc.service")

POLL_S = {"slurm": 10.0, "local": 1.0}
IDLE_POLL_S = 5.0
FAST_S = 1.0                  # cycle period while a deployment starts or stops (no more Slurm calls: see cycle)
HEALTH_CONCURRENCY = 16
HEALTH_TIMEOUT_S = 2.0
UNKNOWN_GRACE_S = 60.0        # a job younger than this that no Slurm command lists yet is not lost (accounting lag)
RECANCEL_S = 30.0
EVENTS_KEPT = 200_000         # the event log keeps this many of the newest events (pruned once an hour)
PRUNE_EVERY_S = 3600.0
LIVE_STATES = ("pending", "starting", "serving", "degraded", "stopping")
REQUEUED = frozenset({"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PENDING"})   # a job that ran and is queued again
NO_ROOM_REPEAT_S = 60.0       # "no node can take it" is said again at most this often
CUTOVER_RETRY_S = 30.0        # after a replacement failed, the next attempt waits this long
SIGNAL_LEAD_S = 120.0         # jobs are sent USR1 this long before their walltime ends (backend.templates.SIGNAL)
NODE_CHECK_S = 30.0           # nodes under running jobs are checked (drained, down) this often, for every deployment
DRAIN_MIN_S = 1.0             # a drained job is cancelled no sooner (the gateway reloads its endpoints first)


class DaemonRunning(ScepsyError):
    """Another daemon holds the state dir."""


@dataclass
class _Live:
    """What the daemon keeps in memory per deployment (all of it can be rebuilt from the state)."""

    shape: ServeConfig | None = None                              # every engine of the plan (serve.json)
    configs: dict[str, ServeConfig] = field(default_factory=dict)   # job id → its serve.json
    served: bool = False
    routes_ok: bool = False
    cancelled_at: float = 0.0
    reaped: bool = False
    healthy_jobs: set[str] = field(default_factory=set)
    no_room: bool = False              # a cut-over found no room for two copies: node by node from now on
    no_room_said: dict[str, float] = field(default_factory=dict)
    retry_at: dict[str, float] = field(default_factory=dict)      # job id → no cut-over attempt before
    rolled_back: set[str] = field(default_factory=set)
    cutover_said: set[str] = field(default_factory=set)
    drain_cancelled: set[str] = field(default_factory=set)
    done_said: set[str] = field(default_factory=set)


def _nodes_of(j: Job) -> list[str]:
    """The nodes a job runs on (its hostlist expanded)."""
    from scepsy_hpc.spec.hostlist import expand_hostlist

    try:
        return expand_hostlist(j.nodes) if j.nodes else []
    except ValueError:
        return [j.nodes]


def _clock(ts: float) -> str:
    """A Unix time as the login node's local clock time (HH:MM:SS)."""
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _unix(text: str) -> float | None:
    """Slurm's local time text (2026-12-06T01:50:00) as Unix seconds; None for '', Unknown, N/A."""
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def acquire_lock(paths: StatePaths) -> int:
    """Hold the state dir's lock (an fd kept open for the daemon's life); DaemonRunning names the holder."""
    paths.ensure()
    check_owned(paths.lock, "lock file")
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DaemonRunning(f"a scepsy daemon already runs for {paths.root} (pid {holder}, socket {paths.socket}); "
                            f"`scepsy daemon status` shows it, `scepsy daemon stop` stops it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Daemon:
    """The control plane of one state dir."""

    def __init__(self, paths: StatePaths, *, poll_s: float | None = None, gateway_host: str = "127.0.0.1",
                 gateway_port: int | None = None, trace: bool = False,
                 backends: dict[str, ClusterBackend] | None = None) -> None:
        self.paths = paths
        self.store = StateStore(paths.db)
        self.fixed_poll_s = poll_s
        self.backends: dict[str, ClusterBackend] = dict(backends or {})
        self.gateway = GatewayProcess(paths.gateway_dir, self.store, gateway_host, gateway_port, trace)
        self.started = time.time()
        self.live: dict[str, _Live] = {}
        self.starting: set[str] = set()
        self.stopping = False
        self.stop_all = False
        self.cycles = 0
        self.last_cycle_s = 0.0
        self.backend_errors = 0
        self.hostname = socket.gethostname()
        self._wake: asyncio.Event | None = None
        self._force = True
        self._polled: dict[str, float] = {}
        self._node_cache: dict[tuple[str, str | None], tuple[float, Any]] = {}
        self._pruned = -PRUNE_EVERY_S
        self._events: asyncio.Condition | None = None
        self._http: Any = None

    # ---- helpers -------------------------------------------------------------------------------
    def backend(self, kind: str) -> ClusterBackend:
        """The backend called `kind`, made once."""
        if kind not in self.backends:
            if kind == "slurm":
                from scepsy_hpc.backend.slurm import SlurmBackend

                self.backends[kind] = SlurmBackend()
            else:
                from scepsy_hpc.backend.local import LocalBackend

                self.backends[kind] = LocalBackend(self.paths.local_jobs)
        return self.backends[kind]

    def event(self, deployment: str | None, kind: str, message: str, **data: Any) -> None:
        """Append an event (written before anything acts on it) and wake whoever follows events."""
        self.store.add_event(deployment, kind, message, data or None)
        log.info("%s%s: %s", f"{deployment}: " if deployment else "", kind, message)
        if self._events is not None:
            cond = self._events

            async def notify() -> None:
                async with cond:
                    cond.notify_all()
            try:
                asyncio.get_running_loop().create_task(notify())
            except RuntimeError:
                pass   # called from a worker thread: followers see it on their next wake-up

    def wake(self) -> None:
        """Run a reconcile cycle now, polling every backend."""
        self._force = True
        if self._wake is not None:
            self._wake.set()

    async def wait_event(self, timeout_s: float) -> None:
        """Until an event is added, or `timeout_s`."""
        assert self._events is not None
        async with self._events:
            try:
                await asyncio.wait_for(self._events.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass

    def backend_poll_s(self, kind: str) -> float:
        """Seconds between two polls of one backend's job states (`--poll`, else 1 s local, 10 s Slurm)."""
        return self.fixed_poll_s or POLL_S.get(kind, 1.0)

    @property
    def poll_s(self) -> float:
        """Seconds between cycles: the fastest any live deployment's backend needs, and no more than
        FAST_S while a deployment is on its way up or down (its engines are watched, not Slurm)."""
        kinds = {j.backend for j in self.store.jobs(live_only=True)}
        every = min((self.backend_poll_s(k) for k in kinds), default=self.fixed_poll_s or IDLE_POLL_S)
        if any(d.state in ("pending", "starting", "stopping") for d in self.store.deployments()):
            every = min(every, FAST_S)
        return every

    def _live(self, name: str) -> _Live:
        return self.live.setdefault(name, _Live())

    def _set_state(self, d: Deployment, state: str, error: str | None = None) -> Deployment:
        if d.state == state and (error is None or error == d.error):
            return d
        fields: dict[str, Any] = {"state": state}
        if error is not None:
            fields["error"] = error
        new = self.store.update_deployment(d.name, **fields)
        self.event(d.name, "state", f"{d.state} → {state}" + (f": {error}" if error else ""), state=state)
        return new

    # ---- life ----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the API and reconcile until told to stop."""
        import aiohttp
        from aiohttp import web

        from scepsy_hpc.service.api import make_app

        self._wake = asyncio.Event()
        self._events = asyncio.Condition()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S), trust_env=False)
        adopted = [j for j in self.store.jobs(live_only=True)]
        self.event(None, "daemon", f"daemon {os.getpid()} started (scepsy {__version__}) on {self.hostname}"
                   + (f"; adopting {len(adopted)} job(s): {', '.join(j.job_id for j in adopted)}" if adopted else ""))
        await asyncio.to_thread(self._gateway_up, True)
        self.paths.socket.unlink(missing_ok=True)   # a stale socket: we hold the lock, so no daemon uses it
        runner = web.AppRunner(make_app(self), access_log=None, handle_signals=False)
        await runner.setup()
        old = os.umask(0o177)
        try:
            await web.UnixSite(runner, str(self.paths.socket)).start()
        finally:
            os.umask(old)
        os.chmod(self.paths.socket, 0o600)
        try:
            while not self.stopping:
                t0 = time.monotonic()
                force, self._force = self._force, False
                try:
                    await self.cycle(force=force)
                except Exception:   # a bug in one cycle must not end the service; it is logged with its traceback
                    log.exception("reconcile cycle failed")
                self.last_cycle_s = time.monotonic() - t0
                self.cycles += 1
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                except asyncio.TimeoutError:
                    pass
            if self.stop_all:
                await self.down_all(timeout_s=120.0)
                await asyncio.to_thread(self.gateway.stop)
        finally:
            await runner.cleanup()
            self.paths.socket.unlink(missing_ok=True)
            await self._http.close()
            self.event(None, "daemon", f"daemon {os.getpid()} stopped"
                       + ("" if self.stop_all else "; deployments and the gateway keep running"))
            self.store.close()

    def request_stop(self, everything: bool = False) -> None:
        """Leave the loop (after this cycle); with `everything`, stop every deployment and the gateway first."""
        self.stop_all = self.stop_all or everything
        self.stopping = True
        self.wake()

    def _gateway_up(self, first: bool = False) -> None:
        """Adopt the gateway the state names, else (re)start it on its port."""
        if self.gateway.alive():
            return
        if first and self.gateway.adopt():
            self.event(None, "gateway", f"adopted the gateway (pid {self.gateway.pid}) on {self.gateway.url}")
            return
        self.write_endpoints()
        was = self.store.get_meta("gateway_pid")
        self.gateway.start()
        self.event(None, "gateway", ("restarted" if was else "started") + f" the gateway (pid {self.gateway.pid}) on "
                   f"{self.gateway.url}")

    # ---- the cycle -----------------------------------------------------------------------------
    async def cycle(self, force: bool = True) -> None:
        """One reconcile pass: jobs (each backend at most every `backend_poll_s`, unless `force`), instances
        and states, routes, the gateway."""
        live = self.store.jobs(live_only=True)
        by_backend: dict[str, list[Job]] = {}
        for j in live:
            by_backend.setdefault(j.backend, []).append(j)
        now = time.monotonic()
        for kind, jobs in by_backend.items():
            if not force and now - self._polled.get(kind, -1e9) < self.backend_poll_s(kind) - 0.05:
                continue
            self._polled[kind] = now
            backend = self.backend(kind)
            refs = [JobRef(j.job_id, j.name, j.submit_time) for j in jobs]
            try:
                statuses = await asyncio.to_thread(backend.poll, refs)
            except ScepsyError as exc:
                self.backend_errors += 1
                if self.backend_errors in (1, 10) or self.backend_errors % 100 == 0:
                    self.event(None, "backend", f"{kind}: cannot read job states ({exc}); trying again every poll")
                continue
            self.backend_errors = 0
            for j in jobs:
                self._observe_job(j, statuses.get(j.job_id))
        for d in self.store.deployments():
            if d.state in LIVE_STATES or d.name in self.starting:
                await self._observe_deployment(d)
        self.write_endpoints()
        if time.monotonic() - self._pruned > PRUNE_EVERY_S:
            self._pruned = time.monotonic()
            await asyncio.to_thread(self.store.prune_events, EVENTS_KEPT)
        if not self.gateway.alive() and not self.stopping:
            try:
                await asyncio.to_thread(self._gateway_up)
            except ScepsyError as exc:
                self.event(None, "gateway", f"cannot restart the gateway: {exc}")

    def _observe_job(self, j: Job, st: JobStatus | None) -> None:
        now = time.time()
        if st is None:
            if now - j.created < UNKNOWN_GRACE_S:
                return
            self._end_job(j, "LOST", f"job {j.job_id} is unknown to {j.backend} (no queue or accounting record)")
            return
        if not owned(JobRef(j.job_id, j.name, j.submit_time), st):
            self._end_job(j, "LOST", f"job id {j.job_id} now belongs to another job ({st.name or '?'}, submitted "
                          f"{st.submit or '?'}): not ours, not adopted; ours ({j.name}) is gone")
            return
        fields: dict[str, Any] = {}
        if not j.submit_time and st.submit:
            fields["submit_time"] = st.submit
        end = _unix(st.end) if st.state == "RUNNING" else None
        if end is not None and end != j.walltime_end:
            fields["walltime_end"] = end   # squeue's expected end of a running job: its walltime
        if st.running and j.started is None:
            fields["started"] = now
            self._note_queue_wait(j, now)
        if st.state != j.state or st.reason != j.reason or (st.nodes and st.nodes != j.nodes):
            fields.update(state=st.state, reason=st.reason, nodes=st.nodes or j.nodes, exit_code=st.exit_code)
            if st.state in FINAL:
                self._end_job(j, st.state, st.reason, exit_code=st.exit_code)
                return
            if j.started is not None and st.state in REQUEUED:
                # requeued (preempted, or its node failed with --requeue): its engines are gone; serve on elsewhere
                self._end_job(j, st.state, f"requeued by Slurm ({st.reason or 'preempted or node failure'}); "
                              "cancelled, its engines are placed anew")
                self._cancel(j)
                return
            self.event(j.deployment, "job", f"job {j.job_id}: {j.state or 'submitted'} → {st.state}"
                       + (f" ({st.reason})" if st.reason else "") + (f" on {st.nodes}" if st.nodes else ""))
        if fields:
            self.store.update_job(j.backend, j.job_id, **fields)

    def _end_job(self, j: Job, state: str, reason: str, exit_code: str = "") -> None:
        self.store.update_job(j.backend, j.job_id, state=state, reason=reason, exit_code=exit_code, ended=time.time())
        self.event(j.deployment, "job", f"job {j.job_id} ended: {state}" + (f" ({reason})" if reason else ""),
                   state=state, reason=reason, job_id=j.job_id)

    # ---- measured times (the cut-over lead) ------------------------------------------------------
    def _ewma(self, key: str, value: float) -> None:
        old = self.store.get_meta(key)
        new = value if old is None else 0.5 * float(old) + 0.5 * value
        self.store.set_meta(key, f"{new:.3f}")

    def _note_queue_wait(self, j: Job, now: float) -> None:
        d = self.store.get_deployment(j.deployment)
        partition = ((d.options or {}).get("template") or {}).get("partition") if d else None
        self._ewma(f"queue_wait_s:{j.backend}:{partition or ''}", max(0.0, now - j.created))

    def lead(self, d: Deployment) -> Lead:
        """How long before a job's end its replacement is asked for (measured on this backend and deployment)."""
        opts = d.options or {}
        kind = opts.get("backend", "local")
        partition = (opts.get("template") or {}).get("partition") or ""
        queue = self.store.get_meta(f"queue_wait_s:{kind}:{partition}")
        healthy = self.store.get_meta(f"healthy_s:{d.name}")
        return Lead(queue_s=float(queue) if queue is not None else DEFAULT_QUEUE_S.get(kind, 30.0),
                    healthy_s=float(healthy) if healthy is not None else DEFAULT_HEALTHY_S,
                    margin_s=float(opts.get("cutover_margin_s", 60.0)))

    # ---- one deployment ------------------------------------------------------------------------
    def _part(self, d: Deployment, j: Job) -> Session:
        """The session directory of job `j` (jobs recorded before there were several per deployment used the
        deployment's own)."""
        return Session(Path(j.session_dir or d.session_dir))

    async def _observe_deployment(self, d: Deployment) -> None:
        if d.name in self.starting:
            return
        lv = self._live(d.name)
        jobs = self.store.jobs(d.name)
        live = [j for j in jobs if j.ended is None]
        if d.desired == "stopped":
            if live:
                d = self._set_state(d, "stopping")
                if time.monotonic() - lv.cancelled_at > RECANCEL_S:
                    lv.cancelled_at = time.monotonic()
                    for j in live:
                        await asyncio.to_thread(self._cancel, j)
                return
            await self._finish_stop(d, lv)
            return
        if await self._adopt_unrecorded(d):
            return
        if lv.shape is None:
            session = Session(Path(d.session_dir))
            try:
                lv.shape = await asyncio.to_thread(session.serve_config)
            except (ScepsyError, OSError) as exc:
                await self._fail(d, live, f"cannot read {session.serve_path}: {exc}")
                return
        now = time.time()
        rows: list[InstanceRow] = []
        for j in live:
            part = self._part(d, j)
            reports = await asyncio.to_thread(part.agents)
            mine = {k: r for k, r in reports.items() if r.job_id in ("", j.job_id)}
            if j.state not in ("RUNNING", "COMPLETING", "CONFIGURING") and not mine:
                continue   # pending: nothing of it runs yet
            if j.started is None:
                j = self.store.update_job(j.backend, j.job_id, started=now)
                self._note_queue_wait(j, now)
            config = lv.configs.get(j.job_id)
            if config is None:
                try:
                    config = lv.configs[j.job_id] = await asyncio.to_thread(part.serve_config)
                except (ScepsyError, OSError) as exc:
                    await self._job_failed(d, lv, j, f"cannot read {part.serve_path}: {exc}")
                    continue
            jrows, why = await self._instances(d, j, config, mine)
            rows += jrows
            healthy = sum(1 for r in jrows if r.healthy)
            if why:
                await self._job_failed(d, lv, j, why)
                continue
            if healthy == len(config.instances):
                if j.job_id not in lv.healthy_jobs:
                    lv.healthy_jobs.add(j.job_id)
                    if j.started is not None:
                        self._ewma(f"healthy_s:{d.name}", max(0.0, now - j.started))
            elif j.started is not None and j.job_id not in lv.healthy_jobs:
                timeout = float((d.options or {}).get("start_timeout_s") or 3600.0)
                if now - max(j.started, self.started) > timeout:
                    await self._job_failed(d, lv, j, f"not every engine was healthy {timeout:g} s after job {j.job_id} "
                                           f"started ({healthy}/{len(config.instances)}); engine logs in {part.log_dir}")
        if self.store.get_deployment(d.name).state == "failed":
            return
        rows = self._route(d, rows)
        self._write_instances(d, rows, lv)
        live = self.store.jobs(d.name, live_only=True)
        if not await self._cover_units(d, lv, live):
            return
        live = self.store.jobs(d.name, live_only=True)
        await self._cutovers(d, lv, live, rows)
        await self._drains(d, lv)
        self._note_cutover_done(d, lv, rows)
        d = self.store.get_deployment(d.name) or d
        if d.state != "serving":
            lv.routes_ok = await self._routed(d.name, rows)
        self._capacity_state(d, lv, rows)

    async def _fail(self, d: Deployment, live: list[Job], why: str) -> None:
        """The deployment failed: say why, take its engines out of the routes, cancel what runs."""
        self._set_state(d, "failed", why)
        rows = self.store.instances(d.name)
        if any(r.healthy or r.routed for r in rows):
            self.store.set_instances(d.name, [dataclasses.replace(r, healthy=False, routed=False, state="stopped",
                                                                  error="the deployment failed") for r in rows])
        for j in live:
            await asyncio.to_thread(self._cancel, j)

    async def _job_failed(self, d: Deployment, lv: _Live, j: Job, why: str) -> None:
        """One job cannot serve (an engine failed past its restarts, or did not start in time). Before the
        deployment ever served this is a mistake to fix (the deployment fails); after, the job is cancelled and
        its unit placed anew (behind the circuit breaker)."""
        if not lv.served and d.state not in ("serving", "degraded"):
            live = [x for x in self.store.jobs(d.name, live_only=True)]
            await self._fail(d, live, why)
            return
        self.event(d.name, "instance-failed", f"job {j.job_id} on {j.nodes or j.unit}: {why}; cancelling it, its engines "
                   "are placed anew", job_id=j.job_id, node=j.nodes or j.unit)
        self._end_job(j, "FAILED", why)
        await asyncio.to_thread(self._cancel, j)

    async def _instances(self, d: Deployment, j: Job, config: ServeConfig,
                         reports: dict[str, AgentReport]) -> tuple[list[InstanceRow], str]:
        """One job's instances as seen now (its agents' reports, agent liveness, /health), and why it failed ('' if not)."""
        now = time.time()
        failed = ""
        sem = asyncio.Semaphore(HEALTH_CONCURRENCY)

        async def probe(url: str) -> bool:
            async with sem:
                try:
                    async with self._http.get(f"{url}/health") as resp:
                        return resp.status == 200
                except Exception:   # any transport failure means "not healthy"
                    return False

        rows: list[InstanceRow] = []
        probes: list[tuple[int, Any]] = []
        for inst in config.instances:
            report = reports.get(inst.node)
            got = next((i for i in report.instances if i.llm == inst.llm and i.replica == inst.replica), None) if report else None
            agent_ok = report is not None and self._agent_alive(report, now)
            state = got.state if got else "waiting"
            error = got.error if got else ""
            if report is not None and report.state == "failed" and not failed:
                failed = f"node {inst.node}: {report.error or 'the node agent failed'}"
            if report is not None and not agent_ok and report.state not in ("stopped",):
                state, error = "lost", f"the node agent on {inst.node} (pid {report.pid}) is gone"
            draining = report is not None and getattr(report, "draining_since", None) is not None
            rows.append(InstanceRow(deployment=d.name, llm=inst.llm, replica=inst.replica, node=inst.node,
                                    gpus=list(got.gpus if got else inst.gpus), url=got.url if got else "", state=state,
                                    healthy=False, pid=got.pid if got else None, restarts=got.restarts if got else 0,
                                    error=error + (" (its job was told to end: draining)" if draining else ""),
                                    updated=now, job_id=j.job_id))
            if got is not None and got.healthy and agent_ok and got.url:
                probes.append((len(rows) - 1, probe(got.url)))
        results = await asyncio.gather(*(p for _, p in probes))
        for (idx, _), ok in zip(probes, results):
            r = rows[idx]
            rows[idx] = dataclasses.replace(r, healthy=ok, state="healthy" if ok else "unhealthy",
                                            error=r.error if ok else f"{r.url}/health does not answer")
        return rows, failed

    def _route(self, d: Deployment, rows: list[InstanceRow]) -> list[InstanceRow]:
        """Which healthy engines the gateway gets: not those of a job being drained, nor those whose agent was
        told its job ends (walltime warning, preemption) while the LLM has other engines to take its calls."""
        live = self.store.jobs(d.name, live_only=True)
        draining_jobs = {j.job_id for j in live if j.drain_started is not None}
        grace = float((d.options or {}).get("drain_grace_s", 120.0))
        now = time.time()
        # a warned job's engines stop taking calls when the signal is not the walltime warning (preemption) or its
        # end is within the drain grace (the replacement is late); otherwise the cut-over moves them in time
        ending = {j.job_id for j in live if j.walltime_end is None or j.walltime_end - now > SIGNAL_LEAD_S + 60
                  or now >= j.walltime_end - grace}
        out = [dataclasses.replace(r, routed=r.healthy and r.job_id not in draining_jobs
                                   and not ("draining" in r.error and r.job_id in ending)) for r in rows]
        for llm in {r.llm for r in out}:
            if not any(r.routed for r in out if r.llm == llm):
                # the LLM has nothing else: a warned job's engines serve on until they end
                out = [dataclasses.replace(r, routed=True) if r.llm == llm and r.healthy
                       and r.job_id not in draining_jobs else r for r in out]
        return out

    async def _routed(self, name: str, rows: list[InstanceRow]) -> bool:
        """Whether the gateway routes to every routed engine of the deployment (the endpoints file is written
        first; the gateway reloads it within a moment)."""
        self.write_endpoints()
        models = (await self._gateway_stats()).get("models", {})
        want: dict[str, int] = {}
        for r in rows:
            if r.routed:
                want[f"{name}/{r.llm}"] = want.get(f"{name}/{r.llm}", 0) + 1
        return bool(want) and all(isinstance(models.get(k), dict) and models[k].get("replicas") == n
                                  for k, n in want.items())

    async def _gateway_stats(self) -> dict[str, Any]:
        """The gateway's /scepsy/v1/stats ({} when it does not answer)."""
        if not self.gateway.url:
            return {}
        try:
            async with self._http.get(f"{self.gateway.url}/scepsy/v1/stats") as resp:
                doc = await resp.json() if resp.status == 200 else {}
                return doc if isinstance(doc, dict) else {}
        except Exception:   # a gateway that does not answer routes nothing yet
            return {}

    def _agent_alive(self, report: AgentReport, now: float) -> bool:
        if report.state in ("failed", "stopped"):
            return False
        if report.host == self.hostname:
            return pid_alive(report.pid)
        return not report_stale(report, now)

    def _write_instances(self, d: Deployment, rows: list[InstanceRow], lv: _Live) -> None:
        before = {(r.job_id, r.llm, r.replica): r for r in self.store.instances(d.name)}
        changed = len(before) != len(rows)
        for r in rows:
            key = (r.job_id, r.llm, r.replica)
            old = before.get(key)
            if old is None or (old.state, old.healthy, old.url, old.pid, old.restarts, old.routed) != \
                    (r.state, r.healthy, r.url, r.pid, r.restarts, r.routed):
                changed = True
            if old is not None and old.restarts < r.restarts:
                self.event(d.name, "engine-restart", f"{r.llm}·{r.replica} on {r.node} was restarted by its node agent "
                           f"({r.restarts} restart(s) so far)", llm=r.llm, replica=r.replica, job_id=r.job_id,
                           restarts=r.restarts)
            if old is None and r.healthy or old is not None and old.routed != r.routed:
                if r.routed:
                    self.event(d.name, "replica-added", f"{r.llm}·{r.replica} on {r.node} (job {r.job_id}) takes calls",
                               llm=r.llm, replica=r.replica, job_id=r.job_id, url=r.url)
                elif old is not None and old.routed:
                    self.event(d.name, "replica-removed", f"{r.llm}·{r.replica} on {r.node} (job {r.job_id}) takes no "
                               "new calls" + (f": {r.state}" + (f" ({r.error})" if r.error else "") if not r.healthy
                                              else ": its job is drained"),
                               llm=r.llm, replica=r.replica, job_id=r.job_id, url=r.url)
        if changed:
            self.store.set_instances(d.name, rows)

    def _capacity_state(self, d: Deployment, lv: _Live, rows: list[InstanceRow]) -> None:
        """serving (every LLM has the plan's engines taking calls), degraded (fewer, after it served), starting."""
        assert lv.shape is not None
        plan = llms_of(lv.shape)
        have = {llm: sum(1 for r in rows if r.llm == llm and r.routed) for llm in plan}
        d = self.store.get_deployment(d.name) or d
        if d.state == "failed":
            return
        if all(have[k] >= n for k, n in plan.items()):
            if d.state != "serving" and not lv.routes_ok:
                return   # serving means reachable: the cycle confirms the gateway loaded the routes (see cycle)
            if d.state != "serving":
                self.event(d.name, "serving", f"every LLM has its {sum(plan.values())} planned engine(s) taking calls; "
                           f"gateway {self.gateway.url}/d/{d.name}/v1")
            lv.served = True
            self._set_state(d, "serving", "")
            return
        short = ", ".join(f"{k} {have[k]}/{n}" for k, n in plan.items() if have[k] < n)
        if lv.served or d.state in ("serving", "degraded"):
            lv.served = True
            self._set_state(d, "degraded", f"capacity below the plan: {short}")
            return
        self._set_state(d, "starting" if any(r.state != "waiting" for r in rows) else "pending")

    # ---- units: every node of the plan served by a live job -------------------------------------
    async def _cover_units(self, d: Deployment, lv: _Live, live: list[Job]) -> bool:
        """Submit a job for every unit no live job serves: never submitted, drained by a cut-over without room,
        or lost (its job ended: walltime, scancel, a failed node, preemption). False when the deployment failed."""
        assert lv.shape is not None
        covered: set[str] = set()
        for j in live:
            covered |= set(j.unit.split(",")) if j.unit else set(units(lv.shape))
        jobs = self.store.jobs(d.name)
        for unit in units(lv.shape):
            if unit in covered:
                continue
            ended = [j for j in jobs if j.ended is not None and unit in (j.unit.split(",") if j.unit else units(lv.shape))]
            last = ended[-1] if ended else None
            if last is None:
                await self._submit_unit(d, lv, unit, why="no job serves it yet")
                continue
            if last.drain_started is not None:   # a cut-over without room for both: the drained job is gone now
                await self._submit_unit(d, lv, unit, replaces=last.job_id, cutover=True,
                                        why=f"cut-over: job {last.job_id} was drained and has ended")
                continue
            why = f"job {last.job_id} ended: {last.state}" + (f" ({last.reason})" if last.reason else "")
            reports = await asyncio.to_thread(self._part(d, last).agents)
            bad = next((r for r in reports.values() if r.state == "failed" and r.job_id in ("", last.job_id)), None)
            if bad is not None:   # the agent that took the job down says why
                why += f"; node {bad.node}: {bad.error or 'the node agent failed'}"
                if not lv.served and d.state not in ("serving", "degraded"):
                    await self._fail(d, self.store.jobs(d.name, live_only=True), why)   # a mistake to fix, not a loss
                    return False
            if last.state in ("NODE_FAIL", "BOOT_FAIL") or (last.state == "LOST" and "agent" in last.reason):
                for node in _nodes_of(last):
                    self._exclude(d, node, f"job {last.job_id} on it ended {last.state}")
            d = self.store.get_deployment(d.name) or d
            if not d.plan_path:
                await self._fail(d, self.store.jobs(d.name, live_only=True), why)
                return False
            if not self._breaker_allows(d, why):
                await self._fail(self.store.get_deployment(d.name) or d, self.store.jobs(d.name, live_only=True),
                                 f"{why}; circuit breaker open after {len((d.options or {}).get('resubmits', []))} "
                                 f"resubmission(s) within {float((d.options or {}).get('resubmit_window_s', 1800)):g} s")
                return False
            nodes = await self._nodes(d)
            self._exclude_bad(d, nodes, _nodes_of(last), f"job {last.job_id} on it ended {last.state}")
            await self._submit_unit(d, lv, unit, why=why, count=True, nodes=nodes)
            if (self.store.get_deployment(d.name) or d).state == "failed":
                return False
        return True

    def _breaker_allows(self, d: Deployment, why: str) -> bool:
        """Whether one more resubmission fits `max_resubmits` within `resubmit_window_s`; says so when it does not."""
        opts = d.options or {}
        window, most = float(opts.get("resubmit_window_s", 1800.0)), int(opts.get("max_resubmits", 3))
        history = [t for t in opts.get("resubmits", []) if time.time() - t < window]
        if len(history) < most:
            return True
        self.event(d.name, "breaker-open", f"{why}; {len(history)} resubmission(s) within {window:g} s already: not "
                   "resubmitting (circuit breaker open); fix the cause and `scepsy up` it again",
                   resubmits=len(history), window_s=window)
        return False

    def _exclude(self, d: Deployment, node: str, why: str) -> None:
        """Place nothing of the deployment on `node` again."""
        d = self.store.get_deployment(d.name) or d
        excluded = dict((d.options or {}).get("excluded_nodes") or {})
        if node in excluded:
            return
        excluded[node] = why
        self.store.update_deployment(d.name, options={**(d.options or {}), "excluded_nodes": excluded})
        self.event(d.name, "node-excluded", f"node {node} excluded: {why}", node=node, reason=why)

    async def _nodes(self, d: Deployment, max_age_s: float = 0.0) -> list[Any] | None:
        """The backend's nodes of the deployment's partition (None: the backend has none to choose from); an
        answer up to `max_age_s` old is reused (one `scontrol show node` serves every deployment)."""
        opts = d.options or {}
        kind, partition = opts.get("backend", "local"), (opts.get("template") or {}).get("partition")
        cached = self._node_cache.get((kind, partition))
        if cached is not None and time.monotonic() - cached[0] <= max_age_s:
            return cached[1]
        try:
            nodes = await asyncio.to_thread(self.backend(kind).nodes, partition)
        except ScepsyError as exc:
            self.event(d.name, "backend", f"cannot read the nodes' states: {exc}")
            return []
        self._node_cache[(kind, partition)] = (time.monotonic(), nodes)
        return nodes

    def _exclude_bad(self, d: Deployment, nodes: list[Any] | None, names: list[str], why: str) -> bool:
        """Exclude those of `names` the backend says are down, drained or failing; whether any was."""
        by_name = {n.name: n for n in nodes or []}
        bad = [n for n in names if n in by_name and not by_name[n].usable]
        for n in bad:
            self._exclude(d, n, f"{why}; Slurm says it is {by_name[n].state}")
        return bool(bad)

    async def _submit_unit(self, d: Deployment, lv: _Live, unit: str, *, why: str, replaces: str = "",
                           cutover: bool = False, count: bool = False, node: str | None = None,
                           nodes: list[Any] | None | bool = False) -> str | None:
        """Submit a job for `unit` on a free node (`node` if given; chosen among `nodes`, read now if not given);
        its id, or None when no node can take it now."""
        assert lv.shape is not None
        d = self.store.get_deployment(d.name) or d
        opts = d.options or {}
        if node is None:
            live_nodes = {n for j in self.store.jobs(d.name, live_only=True) for n in _nodes_of(j)}
            node = choose_node(await self._nodes(d) if nodes is False else nodes, unit, gpus_needed(lv.shape, unit),
                               exclude=(opts.get("excluded_nodes") or {}), avoid=live_nodes)
        if node is None:
            if time.monotonic() - lv.no_room_said.get(unit, -1e9) > NO_ROOM_REPEAT_S:
                lv.no_room_said[unit] = time.monotonic()
                self.event(d.name, "no-room", f"{why}; no node can take node {unit}'s engines now "
                           f"({gpus_needed(lv.shape, unit)} GPU(s) free, usable"
                           + (f", not {', '.join(sorted(opts.get('excluded_nodes') or {}))}" if opts.get("excluded_nodes") else "")
                           + "): trying again every poll", unit=unit)
            return None
        if count:
            now = time.time()
            window = float(opts.get("resubmit_window_s", 1800.0))
            history = [t for t in opts.get("resubmits", []) if now - t < window]
            self.store.update_deployment(d.name, options={**opts, "resubmits": history + [now]})
            self.event(d.name, "resubmit", f"{why}: placing node {unit}'s engines anew on {node} ({len(history) + 1} of at "
                       f"most {int(opts.get('max_resubmits', 3))} within {window:g} s)", unit=unit, node=node)
        template = JobTemplate.model_validate(opts.get("template") or {})
        name = job_name(d.name, unit)
        part = part_dir(Path(d.session_dir), name)
        config = unit_config(lv.shape, unit, node)
        session = Session(part)
        part.mkdir(parents=True, exist_ok=True, mode=0o700)
        await asyncio.to_thread(session.write_serve_config, config)
        job = template.job(name, node, gpus_needed(lv.shape, unit), part)
        backend = self.backend(opts.get("backend", "local"))
        pending = dict(opts.get("pending_jobs") or {})
        pending[name] = {"unit": unit, "replaces": replaces, "session_dir": str(part), "node": node}
        self.store.update_deployment(d.name, options={**(self.store.get_deployment(d.name) or d).options,
                                                      "pending_jobs": pending})
        if cutover:
            self.event(d.name, "cutover-submit", f"{why}: submitting {name} for node {unit}'s engines on {node}",
                       unit=unit, node=node, replaces=replaces)
        else:
            self.event(d.name, "submit", f"submitting job {name}: {len(config.instances)} engine(s) of node {unit} on "
                       f"{node} ({why})", unit=unit, node=node)
        try:
            job_id = await asyncio.to_thread(backend.submit, job)
        except ScepsyError as exc:
            self._drop_pending(d.name, name)
            if not lv.served:
                await self._fail(self.store.get_deployment(d.name) or d, self.store.jobs(d.name, live_only=True),
                                 f"submission failed: {exc}")
                self.store.update_deployment(d.name, desired="stopped")
            else:
                self.event(d.name, "submit", f"submitting {name} failed: {exc}; trying again next poll")
            return None
        self.store.add_job(Job(job_id=job_id, deployment=d.name, backend=opts.get("backend", "local"), name=name,
                               role="replacement" if replaces else "serve", nodes=node, folder=str(job.log_dir),
                               state="PENDING", session_dir=str(part), unit=unit, replaces=replaces))
        self._drop_pending(d.name, name)
        self.event(d.name, "job", f"submitted job {job_id} for node {unit} on {node}; script beside the logs in "
                   f"{job.log_dir}", job_id=job_id, unit=unit, node=node)
        return job_id

    def _drop_pending(self, name: str, job: str) -> None:
        d = self.store.get_deployment(name)
        if d is None:
            return
        pending = dict((d.options or {}).get("pending_jobs") or {})
        if pending.pop(job, None) is not None:
            self.store.update_deployment(name, options={**d.options, "pending_jobs": pending})

    async def _adopt_unrecorded(self, d: Deployment) -> bool:
        """A daemon stopped between submitting a job and recording its id: find each such job by its name (which
        carries a nonce) and record it, or forget the submission when the backend has no such job; whether any
        was adopted."""
        opts = d.options or {}
        pending = dict(opts.get("pending_jobs") or {})
        kind = opts.get("backend", "local")
        adopted = False
        for name, info in pending.items():
            try:
                st = await asyncio.to_thread(self.backend(kind).find_by_name, name)
            except ScepsyError:
                continue
            if st is not None:
                self.store.add_job(Job(job_id=st.job_id, deployment=d.name, backend=kind, name=name,
                                       role="replacement" if info.get("replaces") else "serve",
                                       submit_time=st.submit, nodes=st.nodes or info.get("node", ""),
                                       folder=str(Path(info["session_dir"]) / "logs"), state=st.state, reason=st.reason,
                                       session_dir=info["session_dir"], unit=info.get("unit", ""),
                                       replaces=info.get("replaces", "")))
                self.event(d.name, "job", f"adopted job {st.job_id} ({name}): submitted just before the last daemon "
                           "stopped, never recorded", job_id=st.job_id)
                adopted = True
            else:
                self.event(d.name, "job", f"job {name} was being submitted when the last daemon stopped and the backend "
                           "has no such job: submitting again if it is still needed")
            self._drop_pending(d.name, name)
        return adopted

    # ---- cut-overs -------------------------------------------------------------------------------
    async def _cutovers(self, d: Deployment, lv: _Live, live: list[Job], rows: list[InstanceRow]) -> None:
        """Replace jobs before they end: their walltime is near, their agent was warned (walltime signal,
        preemption), or their node is being drained. With room, make before break (the replacement serves
        first, then the old job is drained); without, one node at a time, break before make."""
        opts = d.options or {}
        if not opts.get("cutover", True) or d.state not in ("serving", "degraded") or not lv.served:
            return
        now = time.time()
        by_id = {j.job_id: j for j in live}
        replaced = {j.replaces for j in live if j.replaces}
        for r in live:   # replacements of jobs still live: drain the old one once the new one serves
            if not r.replaces or r.replaces not in by_id:
                continue
            old = by_id[r.replaces]
            mine = [x for x in rows if x.job_id == r.job_id]
            config = lv.configs.get(r.job_id)
            ready = config is not None and len(mine) == len(config.instances) and all(x.routed for x in mine)
            if old.drain_started is None and ready and await self._routed(d.name, rows):
                self.store.update_job(old.backend, old.job_id, drain_started=now)
                self.event(d.name, "drain", f"job {r.job_id} serves node {r.unit}'s engines on {r.nodes}: draining job "
                           f"{old.job_id} (no new calls; calls in flight get {float(opts.get('drain_grace_s', 120)):g} s)",
                           job_id=old.job_id, replacement=r.job_id)
        for j in self.store.jobs(d.name):   # replacements that ended before their old job
            if j.ended is not None and j.replaces and j.replaces in by_id and by_id[j.replaces].drain_started is None \
                    and j.job_id not in lv.rolled_back:
                lv.rolled_back.add(j.job_id)
                lv.retry_at[j.replaces] = now + CUTOVER_RETRY_S
                self.event(d.name, "cutover-rollback", f"replacement job {j.job_id} ended ({j.state}) before it served; "
                           f"job {j.replaces} serves on; trying again in {CUTOVER_RETRY_S:g} s", job_id=j.job_id)
        if any(j.started is not None for j in live):   # nodes drained or down under running jobs
            nodes = await self._nodes(d, max_age_s=NODE_CHECK_S)
            for j in live:
                if j.drain_started is None and j.job_id not in replaced:
                    self._exclude_bad(d, nodes, _nodes_of(j), f"job {j.job_id} runs on it")
            opts = (self.store.get_deployment(d.name) or d).options or {}
        lead = self.lead(d)
        due: list[tuple[Job, str]] = []
        warned = {x.job_id for x in rows if "draining" in x.error}
        sequential = lv.no_room and len(units(lv.shape)) > 1
        for j in live:
            if j.job_id in replaced or j.drain_started is not None or j.started is None or j.replaces in by_id:
                continue
            if now < lv.retry_at.get(j.job_id, 0.0):
                continue
            if j.walltime_end is not None and now >= j.walltime_end - lead.total_s * (len(units(lv.shape)) if sequential else 1):
                due.append((j, f"job {j.job_id} ends at {_clock(j.walltime_end)} (in {max(0.0, j.walltime_end - now):.0f} s; "
                               f"lead {lead.total_s:.0f} s = queue {lead.queue_s:.0f} + healthy {lead.healthy_s:.0f} + "
                               f"margin {lead.margin_s:.0f})"))
            elif j.job_id in warned and (j.walltime_end is None or j.walltime_end - now > SIGNAL_LEAD_S + 60):
                due.append((j, f"job {j.job_id} was told by Slurm that it ends soon, well before its walltime "
                               "(preemption)"))
            elif any(n in (opts.get("excluded_nodes") or {}) for n in _nodes_of(j)):
                due.append((j, f"job {j.job_id} runs on an excluded node ({j.nodes})"))
        if not due:
            return
        covered = {u for x in live for u in (x.unit.split(",") if x.unit else units(lv.shape))}
        # a node mid-replacement: drained and not yet ended, its unit uncovered, or a replacement not yet serving
        busy = (any(x.drain_started is not None for x in live) or any(x.replaces in by_id for x in live)
                or not set(units(lv.shape)) <= covered
                or any(x.replaces and x.job_id not in lv.done_said for x in live))
        for j, why in due:
            if j.job_id in lv.cutover_said:
                continue
            unit = j.unit or units(lv.shape)[0]
            started = await self._submit_unit(d, lv, unit, why=why, replaces=j.job_id, cutover=True) \
                if not (lv.no_room and busy) else None
            if started is not None:
                lv.cutover_said.add(j.job_id)
                self.event(d.name, "cutover-start", f"{why}: replacement job {started} for node {unit} submitted; job "
                           f"{j.job_id} serves until the replacement's engines take calls", job_id=j.job_id,
                           replacement=started)
                continue
            # no room for both copies: one node at a time, the others serving meanwhile
            lv.no_room = True
            if busy:
                continue   # another node is being replaced: this one waits its turn
            plan = llms_of(lv.shape)
            left = {llm: sum(1 for x in rows if x.llm == llm and x.routed and x.job_id != j.job_id) for llm in plan}
            zero = sorted(llm for llm, n in left.items() if n == 0 and llm in llms_of(lv.shape, unit))
            self.store.update_job(j.backend, j.job_id, drain_started=now)
            lv.cutover_said.add(j.job_id)
            self.event(d.name, "cutover-start", f"{why}; no room for both copies: replacing node by node, draining job "
                       f"{j.job_id} first, then its replacement starts on {j.nodes}; capacity meanwhile: "
                       + ", ".join(f"{k} {left[k]}/{n}" for k, n in plan.items())
                       + (f" — {', '.join(zero)} has no other engine: the gateway holds its calls until the replacement "
                          "serves" if zero else ""), job_id=j.job_id, no_room=True)
            self.event(d.name, "drain", f"draining job {j.job_id} (no new calls; calls in flight get "
                       f"{float(opts.get('drain_grace_s', 120)):g} s)", job_id=j.job_id)
            busy = True

    async def _drains(self, d: Deployment, lv: _Live) -> None:
        """Cancel each drained job once the gateway has no call in flight on its engines (or its grace passed)."""
        live = [j for j in self.store.jobs(d.name, live_only=True) if j.drain_started is not None]
        if not live:
            return
        grace = float((d.options or {}).get("drain_grace_s", 120.0))
        stats = await self._gateway_stats()
        draining = stats.get("draining") if isinstance(stats.get("draining"), dict) else None
        rows = self.store.instances(d.name)
        now = time.time()
        for j in live:
            if j.job_id in lv.drain_cancelled:
                continue
            urls = {r.url for r in rows if r.job_id == j.job_id and r.url}
            in_flight = sum(int(draining.get(u, 0)) for u in urls) if draining is not None else None
            waited = now - j.drain_started
            if waited < DRAIN_MIN_S or (in_flight != 0 and waited < grace):
                continue
            lv.drain_cancelled.add(j.job_id)
            self.event(d.name, "drained", f"job {j.job_id} drained in {waited:.1f} s"
                       + (f" ({in_flight} call(s) still in flight after the {grace:g} s grace)" if in_flight else "")
                       + "; cancelling it", job_id=j.job_id, in_flight=in_flight, waited_s=round(waited, 3))
            await asyncio.to_thread(self._cancel, j)

    def _note_cutover_done(self, d: Deployment, lv: _Live, rows: list[InstanceRow]) -> None:
        """cutover-done once a replaced job has ended and every engine of its replacement takes calls."""
        jobs = self.store.jobs(d.name)
        by_id = {j.job_id: j for j in jobs}
        for r in jobs:
            old = by_id.get(r.replaces)
            if r.ended is not None or old is None or old.ended is None or r.job_id in lv.done_said:
                continue
            config = lv.configs.get(r.job_id)
            mine = [x for x in rows if x.job_id == r.job_id]
            if config is None or len(mine) != len(config.instances) or not all(x.routed for x in mine):
                continue
            lv.done_said.add(r.job_id)
            began = min(r.created, old.drain_started or r.created)
            took = time.time() - began
            self.event(d.name, "cutover-done", f"job {old.job_id} ({old.state}) replaced by job {r.job_id} on {r.nodes} "
                       f"in {took:.1f} s", job_id=old.job_id, replacement=r.job_id, took_s=round(took, 3))

    async def _finish_stop(self, d: Deployment, lv: _Live) -> None:
        rows = self.store.instances(d.name)
        if any(r.healthy or r.routed or r.state not in ("stopped", "lost") for r in rows):
            self.store.set_instances(d.name, [dataclasses.replace(r, healthy=False, routed=False, state="stopped",
                                                                  error="stopped", updated=time.time()) for r in rows])
        await self._reap(d, lv)
        self._set_state(d, "stopped", "")

    async def _reap(self, d: Deployment, lv: _Live) -> None:
        """Stop engines that outlived their agent on this host (each agent's report names its process groups), in
        the session directory of every job the deployment had."""
        if lv.reaped:
            return
        lv.reaped = True
        parts = {Path(d.session_dir)} | {Path(j.session_dir) for j in self.store.jobs(d.name) if j.session_dir}

        def reports() -> list[AgentReport]:
            return [r for p in parts for r in Session(p).agents().values() if r.host == self.hostname]

        found = await asyncio.to_thread(reports)
        if not found:
            return
        stopped = await asyncio.to_thread(reap_engines, found)
        if stopped:
            self.event(d.name, "reap", f"stopped {len(stopped)} engine(s) left behind by their node agent: "
                       f"process groups {', '.join(map(str, stopped))}")

    def _cancel(self, j: Job) -> None:
        try:
            self.backend(j.backend).cancel(j.job_id)
        except ScepsyError as exc:
            self.event(j.deployment, "job", f"cancelling job {j.job_id} failed: {exc}")

    # ---- routes --------------------------------------------------------------------------------
    def write_endpoints(self) -> None:
        """The gateway's endpoints file from every deployment's routed engines (rewritten only on change)."""
        from scepsy_hpc.gateway.endpoints import Endpoints, LLMEndpoint, Replica, merge_endpoints, write_endpoints

        per: dict[str, Endpoints] = {}
        rows = self.store.instances()
        for d in self.store.deployments():
            if d.state not in ("starting", "serving", "degraded"):
                continue
            aliases = (d.options or {}).get("aliases") or {}
            # every LLM of the plan keeps its key while it has no engine (a node being replaced): the gateway holds
            # its calls for --hold-s instead of answering "no such model"
            shape = self.live[d.name].shape if d.name in self.live else None
            keys = sorted({r.llm for r in rows if r.deployment == d.name} | set(llms_of(shape) if shape else ()))
            llms = {k: LLMEndpoint(served_model=k, aliases=list(aliases.get(k, [])),
                                   replicas=[Replica(url=u) for u in dict.fromkeys(
                                       r.url for r in rows if r.deployment == d.name and r.llm == k and r.routed and r.url)])
                    for k in keys}
            per[d.name] = Endpoints(llms=llms)
        self.gateway.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_endpoints(self.gateway.endpoints, merge_endpoints(per, None))

    # ---- actions the API asks for --------------------------------------------------------------
    async def up(self, req: UpRequest) -> Deployment:
        """Record the deployment, prepare it (plan, place, serve.json) and submit one job per node of its plan."""
        from scepsy_hpc.backend.base import check_name

        check_name(req.name, "deployment name")
        old = self.store.get_deployment(req.name)
        if old is not None or req.name in self.starting:
            if req.name in self.starting or old.state in LIVE_STATES or any(j.ended is None for j in self.store.jobs(req.name)):
                raise SpecError(f"deployment {req.name!r} is already {old.state if old else 'starting'}; "
                                f"`scepsy down {req.name}` first, or give another --name")
            self.store.delete_deployment(req.name)
        self.live.pop(req.name, None)
        session_dir = self.paths.session_dir(req.name)
        for stale in list((session_dir / "agents").glob("*.json")):
            stale.unlink(missing_ok=True)
        await asyncio.to_thread(shutil.rmtree, session_dir / "jobs", True)   # a stopped deployment's job directories
        now = time.time()
        self.starting.add(req.name)
        try:
            self.store.add_deployment(Deployment(
                name=req.name, desired="serving", state="pending", target=req.target, plan_path="", spec_paths=[],
                options=req.model_dump(), session_dir=str(session_dir), error="", created=now, updated=now))
            self.event(req.name, "up", f"deployment of {req.target} requested ({req.backend}, engine {req.engine})")
            backend = self.backend(req.backend)
            try:
                prepared = await asyncio.to_thread(prepare, req, session_dir, backend,
                                                   lambda m: self.event(req.name, "plan", m))
            except ScepsyError as exc:
                self.store.delete_deployment(req.name)
                self.event(req.name, "up", f"refused, nothing submitted: {exc}")
                raise
            d = self.store.update_deployment(
                req.name, plan_path=str(prepared.plan_path), spec_paths=list(prepared.spec_paths),
                options={**req.model_dump(), "workflows": list(prepared.workflows),
                         "aliases": {k: list(v) for k, v in prepared.aliases.items()},
                         "template": prepared.template.model_dump()})
            lv = self._live(req.name)
            lv.shape = prepared.config
            for unit in units(prepared.config):
                job_id = await self._submit_unit(d, lv, unit, why="scepsy up", node=unit)
                if job_id is None:
                    failed = self.store.get_deployment(req.name)
                    raise SlurmError(failed.error if failed is not None and failed.error else
                                     f"submitting the job of node {unit} failed")
        finally:
            self.starting.discard(req.name)
            self.wake()
        dep = self.store.get_deployment(req.name)
        assert dep is not None
        return dep

    def down(self, name: str) -> Deployment:
        """Ask for a deployment to stop (the cycle cancels its job and waits for it to leave the queue)."""
        d = self.require(name)
        if d.desired != "stopped":
            d = self.store.update_deployment(name, desired="stopped")
            self.event(name, "down", "stop requested")
            self._live(name).cancelled_at = 0.0
        self.wake()
        return d

    async def down_all(self, timeout_s: float) -> None:
        """Stop every deployment and wait until each is stopped or failed."""
        for d in self.store.deployments():
            if d.state in LIVE_STATES:
                self.down(d.name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await self.cycle()
            if all(d.state not in LIVE_STATES for d in self.store.deployments()):
                return
            await asyncio.sleep(0.5)

    def require(self, name: str) -> Deployment:
        """The deployment called `name`; SpecError listing the others."""
        d = self.store.get_deployment(name)
        if d is None:
            names = [x.name for x in self.store.deployments()]
            raise SpecError(f"no deployment {name!r} here ({self.paths.root}); deployments: {', '.join(names) or 'none'}")
        return d

    def slurm_calls(self, window_s: float = 60.0) -> int:
        """Commands the backends ran in the last `window_s` seconds (on Slurm: squeue, sacct, sbatch, scancel)."""
        return sum(b.calls_in(window_s) for b in self.backends.values() if b.name == "slurm")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m scepsy_hpc.service.daemon`: hold the lock, log to the state dir, serve until stopped."""
    ap = argparse.ArgumentParser(prog="python -m scepsy_hpc.service.daemon", description=__doc__.splitlines()[0])
    ap.add_argument("--state-dir")
    ap.add_argument("--poll", type=float, default=None, help="seconds between reconcile cycles (default 1 s local, 10 s Slurm)")
    ap.add_argument("--gateway-host", default="127.0.0.1")
    ap.add_argument("--gateway-port", type=int, default=None)
    ap.add_argument("--trace", action="store_true", help="the gateway appends every call to gateway/trace.jsonl")
    args = ap.parse_args(argv)
    paths = StatePaths.of(args.state_dir)

    def body() -> int:
        fd = acquire_lock(paths)
        try:
            if not logging.getLogger().handlers:
                logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            daemon = Daemon(paths, poll_s=args.poll, gateway_host=args.gateway_host, gateway_port=args.gateway_port,
                            trace=args.trace)
            asyncio.run(daemon.run())
        finally:
            os.close(fd)
        return 0

    return run_entry(body, prog="scepsy daemon")


if __name__ == "__main__":
    sys.exit(main())
