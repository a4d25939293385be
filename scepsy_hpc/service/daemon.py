"""The login-node daemon: owns the desired state, talks to Slurm, supervises the gateway, answers the CLI.

    python -m scepsy_hpc.service.daemon [--state-dir D] [--poll S] [--gateway-host H] [--gateway-port P]

(`scepsy daemon start` runs this detached; `--foreground` in the same process.) One daemon per state
dir, held by a lock. Three kinds of process, so that no single failure stops traffic: this daemon
(control plane), the gateway (data plane, its own process), and the jobs' node agents and engines.

**Jobs.** A deployment is served by one job per node of its plan (a *unit*: service/units.py; the
steps that replace jobs are service/continuity.py, mixed into `Daemon`), so
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
from pathlib import Path
from typing import Any, Sequence

from scepsy_hpc import __version__
from scepsy_hpc.backend.agent import reap_engines, report_stale
from scepsy_hpc.backend.base import FINAL, ClusterBackend, JobRef, JobStatus, owned
from scepsy_hpc.backend.records import AgentReport, ServeConfig
from scepsy_hpc.backend.session import Session
from scepsy_hpc.engine.supervisor import pid_alive
from scepsy_hpc.errors import ScepsyError, SlurmError, SpecError, run_entry
from scepsy_hpc.service.continuity import ABANDONED, SIGNAL_LEAD_S, Continuity, Live
from scepsy_hpc.service.deploy import UpRequest, prepare
from scepsy_hpc.service.units import llms_of, units
from scepsy_hpc.service.gateway_proc import GatewayProcess
from scepsy_hpc.service.keys import Keys
from scepsy_hpc.service.paths import StatePaths, check_owned
from scepsy_hpc.service.state import Deployment, InstanceRow, Job, StateStore

log = logging.getLogger("scepsy_hpc.service")

POLL_S = {"slurm": 10.0, "local": 1.0}
IDLE_POLL_S = 5.0
FAST_S = 1.0                  # cycle period while a deployment starts or stops (no more Slurm calls: see cycle)
HEALTH_CONCURRENCY = 16
HEALTH_TIMEOUT_S = 2.0
SLOW_PROBES = 3               # /health timing out this many cycles in a row makes an engine unhealthy
UNKNOWN_GRACE_S = 60.0        # a job younger than this that no Slurm command lists yet is not lost (accounting lag)
RECANCEL_S = 30.0
EVENTS_KEPT = 200_000         # the event log keeps this many of the newest events (pruned once an hour)
PRUNE_EVERY_S = 3600.0
LIVE_STATES = ("pending", "starting", "serving", "degraded", "stopping")
REQUEUED = frozenset({"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PENDING"})   # a job that ran and is queued again


class DaemonRunning(ScepsyError):
    """Another daemon holds the state dir."""


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


class Daemon(Continuity):
    """The control plane of one state dir."""

    def __init__(self, paths: StatePaths, *, poll_s: float | None = None, gateway_host: str = "127.0.0.1",
                 gateway_port: int | None = None, trace: bool = False,
                 backends: dict[str, ClusterBackend] | None = None) -> None:
        self.paths = paths
        self.store = StateStore(paths.db)
        self.keys = Keys(self.store)
        self.fixed_poll_s = poll_s
        self.backends: dict[str, ClusterBackend] = dict(backends or {})
        self.gateway = GatewayProcess(paths.gateway_dir, self.store, gateway_host, gateway_port, trace)
        self.started = time.time()
        self.live: dict[str, Live] = {}
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
        self._recancelled: dict[str, float] = {}   # abandoned job id → when it was last cancelled
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

    def _live(self, name: str) -> Live:
        return self.live.setdefault(name, Live())

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
            if j.started is not None and st.state in REQUEUED and j.role != ABANDONED:
                # requeued (preempted, or its node failed): its engines are gone; serve on elsewhere, and cancel it
                # until it has left the queue (a requeued job cancelled while completing would come back)
                self._abandon(j, f"requeued by Slurm ({st.reason or 'preempted or node failure'})")
                return
            self.event(j.deployment, "job", f"job {j.job_id}: {j.state or 'submitted'} → {st.state}"
                       + (f" ({st.reason})" if st.reason else "") + (f" on {st.nodes}" if st.nodes else ""))
        if fields:
            self.store.update_job(j.backend, j.job_id, **fields)

    def _abandon(self, j: Job, why: str) -> None:
        """Give up on a live job: it serves nothing from now on (its unit is placed anew) and is cancelled, again
        every RECANCEL_S, until the backend says it ended."""
        self.store.update_job(j.backend, j.job_id, role=ABANDONED, reason=why)
        self.event(j.deployment, "job", f"job {j.job_id} abandoned: {why}; cancelling it, its engines are placed anew",
                   job_id=j.job_id, reason=why)
        self._recancelled[j.job_id] = time.monotonic()
        self._cancel(j)

    def _end_job(self, j: Job, state: str, reason: str, exit_code: str = "") -> None:
        self.store.update_job(j.backend, j.job_id, state=state, reason=reason, exit_code=exit_code, ended=time.time())
        self.event(j.deployment, "job", f"job {j.job_id} ended: {state}" + (f" ({reason})" if reason else ""),
                   state=state, reason=reason, job_id=j.job_id)

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
                jobs = self.store.jobs(d.name)
                last = jobs[-1] if jobs and not live else None   # its end is the news; the missing file only why not again
                await self._fail(d, live, (f"job {last.job_id} ended: {last.state}" + (f" ({last.reason})" if last.reason
                                                                                      else "") + "; nothing to place again: "
                                           if last is not None and last.ended is not None else "")
                                 + f"cannot read {session.serve_path}: {exc}")
                return
        now = time.time()
        rows: list[InstanceRow] = []
        for j in live:
            if j.role == ABANDONED:   # cancelled, not yet gone: cancel again now and then
                if time.monotonic() - self._recancelled.get(j.job_id, 0.0) > RECANCEL_S:
                    self._recancelled[j.job_id] = time.monotonic()
                    await asyncio.to_thread(self._cancel, j)
                continue
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
            if why:
                await self._job_failed(d, lv, j, why)
                continue
            rows += jrows
            healthy = sum(1 for r in jrows if r.healthy)
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
        self._note_cutover_done(d, lv, rows)   # before the next node's cut-over starts: events in causal order
        live = self.store.jobs(d.name, live_only=True)
        await self._cutovers(d, lv, live, rows)
        await self._drains(d, lv)
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

    async def _job_failed(self, d: Deployment, lv: Live, j: Job, why: str) -> None:
        """One job cannot serve (an engine failed past its restarts, or did not start in time). Before the
        deployment ever served this is a mistake to fix (the deployment fails); after, the job is cancelled and
        its unit placed anew (behind the circuit breaker)."""
        if not lv.served and d.state not in ("serving", "degraded"):
            live = [x for x in self.store.jobs(d.name, live_only=True)]
            await self._fail(d, live, why)
            return
        self.event(d.name, "instance-failed", f"job {j.job_id} on {j.nodes or j.unit}: {why}", job_id=j.job_id,
                   node=j.nodes or j.unit)
        await asyncio.to_thread(self._abandon, j, why)

    async def _instances(self, d: Deployment, j: Job, config: ServeConfig,
                         reports: dict[str, AgentReport]) -> tuple[list[InstanceRow], str]:
        """One job's instances as seen now (its agents' reports, agent liveness, /health), and why it failed ('' if not)."""
        now = time.time()
        failed = ""
        sem = asyncio.Semaphore(HEALTH_CONCURRENCY)

        secret = j.engine_secret or config.engine_secret
        auth = {"Authorization": f"Bearer {secret}"} if secret else {}

        async def probe(url: str) -> str:
            async with sem:
                try:
                    async with self._http.get(f"{url}/health", headers=auth) as resp:
                        return "ok" if resp.status == 200 else f"answers {resp.status}"
                except asyncio.TimeoutError:
                    return "slow"
                except Exception as exc:   # any other transport failure means "not healthy"
                    return f"does not answer ({type(exc).__name__})"

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
        lv = self._live(d.name)
        for (idx, _), said in zip(probes, results):
            r = rows[idx]
            key = (r.job_id, r.llm, r.replica)
            # a probe that timed out on a busy login node is not a dead engine: that takes SLOW_PROBES in a row (a
            # refused connection or an error status counts at once; the gateway routes around a dead one anyway)
            slow = lv.slow_probes[key] = lv.slow_probes.get(key, 0) + 1 if said == "slow" else 0
            ok = said == "ok" or (said == "slow" and slow < SLOW_PROBES)
            rows[idx] = dataclasses.replace(r, healthy=ok, state="healthy" if ok else "unhealthy",
                                            error=r.error if ok else f"{r.url}/health " + (
                                                f"timed out {slow} times in a row" if said == "slow" else said))
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

    async def reload_gateway(self) -> None:
        """Have the gateway load the endpoints file now (its stats re-read it first), so a key just created
        or revoked counts from the caller's next call, not ~0.2 s later."""
        await self._gateway_stats()

    async def _gateway_stats(self) -> dict[str, Any]:
        """The gateway's /scepsy/v1/stats ({} when it does not answer)."""
        if not self.gateway.url:
            return {}
        try:
            async with self._http.get(f"{self.gateway.url}/scepsy/v1/stats", headers=self.gateway_auth()) as resp:
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

    def _write_instances(self, d: Deployment, rows: list[InstanceRow], lv: Live) -> None:
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

    def _capacity_state(self, d: Deployment, lv: Live, rows: list[InstanceRow]) -> None:
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

    async def _finish_stop(self, d: Deployment, lv: Live) -> None:
        rows = self.store.instances(d.name)
        if any(r.healthy or r.routed or r.state not in ("stopped", "lost") for r in rows):
            self.store.set_instances(d.name, [dataclasses.replace(r, healthy=False, routed=False, state="stopped",
                                                                  error="stopped", updated=time.time()) for r in rows])
        await self._reap(d, lv)
        self._set_state(d, "stopped", "")

    async def _reap(self, d: Deployment, lv: Live) -> None:
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
    def gateway_auth(self) -> dict[str, str]:
        """The header that lets the daemon read the gateway's stats and metrics (its own key)."""
        return {"Authorization": f"Bearer {self.keys.daemon_key()}"}

    def engine_secrets(self) -> dict[str, str]:
        """Job id → its engines' secret, for every live job that has one."""
        out = {j.job_id: j.engine_secret for j in self.store.jobs(live_only=True) if j.engine_secret}
        for lv in self.live.values():
            for job_id, config in lv.configs.items():
                if job_id not in out and config.engine_secret:
                    out[job_id] = config.engine_secret
        return out

    def write_endpoints(self) -> None:
        """The gateway's endpoints file from every deployment's routed engines, each with its job's engine secret
        and its routing weight (a mixed group's unlike replicas: the deployment's `weights`, computed from its plan at
        `up`), and every working client key (rewritten only on change; the gateway reloads it within ~0.2 s)."""
        from scepsy_hpc.gateway.endpoints import (Endpoints, LLMEndpoint, Replica, merge_endpoints, replica_weight,
                                                  write_endpoints)

        per: dict[str, Endpoints] = {}
        caps: dict[str, int] = {}   # the gateway's request cap per deployment (gateway/admission.py)
        rows = self.store.instances()
        secrets = self.engine_secrets()
        for d in self.store.deployments():
            if d.state not in ("starting", "serving", "degraded"):
                continue
            aliases = (d.options or {}).get("aliases") or {}
            weights = (d.options or {}).get("weights") or {}
            # every LLM of the plan keeps its key while it has no engine (a node being replaced): the gateway holds
            # its calls for --hold-s instead of answering "no such model"
            shape = self.live[d.name].shape if d.name in self.live else None
            keys = sorted({r.llm for r in rows if r.deployment == d.name} | set(llms_of(shape) if shape else ()))
            llms = {k: LLMEndpoint(served_model=k, aliases=list(aliases.get(k, [])),
                                   replicas=[Replica(url=u, api_key=s, weight=w) for u, (s, w) in dict(
                                       (r.url, (secrets.get(r.job_id), replica_weight(weights, k, r.replica)))
                                       for r in rows
                                       if r.deployment == d.name and r.llm == k and r.routed and r.url).items()])
                    for k in keys}
            per[d.name] = Endpoints(llms=llms)
            cap = (d.options or {}).get("request_cap")
            if isinstance(cap, int) and cap >= 1 and llms:
                caps[d.name] = cap
        self.gateway.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        merged = merge_endpoints(per, None).model_copy(update={"auth": self.keys.auth(), "max_requests": caps or None})
        if write_endpoints(self.gateway.endpoints, merged):
            # one line per version of the file, so a gateway that did not reload it can be told apart from a
            # daemon that did not write it (daemon.log beside gateway.log)
            log.info("endpoints: wrote %s: %s", self.gateway.endpoints,
                     ", ".join(f"{n} ({len(e.replicas)} replicas)" for n, e in sorted(merged.llms.items())) or "no LLM")

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
                         "weights": {k: list(v) for k, v in prepared.weights.items()},   # mixed groups only
                         "request_cap": prepared.max_requests,
                         "template": prepared.template.model_dump()})
            if prepared.max_requests is not None:
                self.event(req.name, "plan", f"the gateway lets at most {prepared.max_requests} requests be in flight, "
                           "later ones wait" + (" (the plan's predicted.max_requests)" if req.max_requests == "plan"
                                                else ""))
            owner = await asyncio.to_thread(self.keys.ensure_owner, req.name, session_dir)
            self.event(req.name, "key", f"owner key {owner.id}: `scepsy keys show {req.name}` prints it", key_id=owner.id)
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
    ap.add_argument("--trace", action="store_true",
                    help="the gateway writes every call to gateway/traces/gateway-UTC-PID.jsonl, one file per start")
    args = ap.parse_args(argv)
    paths = StatePaths.of(args.state_dir)

    def body() -> int:
        # whatever the daemon and its children (the gateway, local jobs, engines) create is this user's only,
        # even when started under `umask 000`
        os.umask(0o077)
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
