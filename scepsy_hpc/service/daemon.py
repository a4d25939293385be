"""The login-node daemon: owns the desired state, talks to Slurm, supervises the gateway, answers the CLI.

    python -m scepsy_hpc.service.daemon [--state-dir D] [--poll S] [--gateway-host H] [--gateway-port P]

(`scepsy daemon start` runs this detached; `--foreground` in the same process.) One daemon per state
dir, held by a lock. Three kinds of process, so that no single failure stops traffic: this daemon
(control plane), the gateway (data plane, its own process), and the jobs' node agents and engines.

**Reconcile loop**, every `poll_s` (1 s while only local deployments live, 10 s with Slurm ones, 5 s
with none; 1 s while a deployment starts or stops, its backend still polled at its own period):
1. *Jobs*: one `poll()` per backend in use, whatever the number of deployments (on Slurm one
   `squeue --me`, plus one batched `sacct` for jobs that left the queue). A job is ours only if id,
   name (it carries a nonce) and submit time all match; a recycled id is an event, never adopted.
   A job that ended is recorded with the backend's state and reason.
2. *Instances*: the agents' reports in the session directories, an agent's liveness (its pid on
   this host, else its heartbeat), and one GET /health per engine (at most 16 at once).
3. *State*: pending → starting → serving (→ degraded while some engine is unhealthy), stopping →
   stopped, or failed (the job ended, an engine failed to start, the start deadline passed).
4. *Routes*: the gateway's endpoints file from every deployment's healthy engines.
5. *Gateway*: restarted on its port if it died.

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
from scepsy_hpc.errors import ScepsyError, SpecError, run_entry
from scepsy_hpc.service.deploy import UpRequest, prepare
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


class DaemonRunning(ScepsyError):
    """Another daemon holds the state dir."""


@dataclass
class _Live:
    """What the daemon keeps in memory per deployment (all of it can be rebuilt from the state)."""

    config: ServeConfig | None = None
    running_since: float | None = None
    served: bool = False
    cancelled_at: float = 0.0
    health: dict[tuple[str, int], bool] = field(default_factory=dict)
    reaped: bool = False


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
        if st.state != j.state or st.reason != j.reason or (st.nodes and st.nodes != j.nodes):
            fields.update(state=st.state, reason=st.reason, nodes=st.nodes or j.nodes, exit_code=st.exit_code)
            if st.state in FINAL:
                self._end_job(j, st.state, st.reason, exit_code=st.exit_code)
                return
            self.event(j.deployment, "job", f"job {j.job_id}: {j.state or 'submitted'} → {st.state}"
                       + (f" ({st.reason})" if st.reason else "") + (f" on {st.nodes}" if st.nodes else ""))
        if fields:
            self.store.update_job(j.backend, j.job_id, **fields)

    def _end_job(self, j: Job, state: str, reason: str, exit_code: str = "") -> None:
        self.store.update_job(j.backend, j.job_id, state=state, reason=reason, exit_code=exit_code, ended=time.time())
        self.event(j.deployment, "job", f"job {j.job_id} ended: {state}" + (f" ({reason})" if reason else ""),
                   state=state, reason=reason)

    async def _observe_deployment(self, d: Deployment) -> None:
        if d.name in self.starting:
            return
        lv = self._live(d.name)
        jobs = self.store.jobs(d.name)
        live = [j for j in jobs if j.ended is None]
        session = Session(Path(d.session_dir))
        if d.desired == "stopped":
            if live:
                d = self._set_state(d, "stopping")
                if time.monotonic() - lv.cancelled_at > RECANCEL_S:
                    lv.cancelled_at = time.monotonic()
                    for j in live:
                        await asyncio.to_thread(self._cancel, j)
                return
            await self._finish_stop(d, session, lv)
            return
        if not live:
            if not jobs and (d.options or {}).get("submitting") and await self._adopt_unrecorded(d):
                return
            last = jobs[-1] if jobs else None
            why = (f"job {last.job_id} ended: {last.state}" + (f" ({last.reason})" if last.reason else "")
                   if last else "no job was submitted (the daemon stopped while submitting): run `scepsy up` again")
            bad = None
            if last is not None and d.state != "failed":   # the agent that took the job down says why
                reports = await asyncio.to_thread(session.agents)
                bad = next((r for r in reports.values() if r.state == "failed" and r.job_id in ("", last.job_id)), None)
                if bad is not None:
                    why += f"; node {bad.node}: {bad.error or 'the node agent failed'}"
            await self._mark_instances_down(d, session, "the job ended")
            if last is not None and bad is None and d.plan_path:
                await self._resubmit(d, why)   # scancel from outside, walltime, a lost node: serve on in a new job
                return
            self._set_state(d, "failed", why)
            return
        job = live[-1]
        reports = await asyncio.to_thread(session.agents)
        # agents that report run in the job: it runs, whatever the last poll of the queue said
        started = any(r.job_id in ("", job.job_id) for r in reports.values())
        if job.state not in ("RUNNING", "COMPLETING", "CONFIGURING") and not started:
            self._set_state(d, "pending")
            return
        if lv.running_since is None:
            lv.running_since = time.time()
        if lv.config is None:
            try:
                lv.config = await asyncio.to_thread(session.serve_config)
            except (ScepsyError, OSError) as exc:
                self._set_state(d, "failed", f"cannot read {session.serve_path}: {exc}")
                await asyncio.to_thread(self._cancel, job)
                return
        rows, failed = await self._instances(d, lv, reports)
        self._write_instances(d, rows, lv)
        if failed:
            self._set_state(d, "failed", failed)
            await asyncio.to_thread(self._cancel, job)
            return
        expected = len(lv.config.instances)
        healthy = sum(1 for r in rows if r.healthy)
        if healthy == expected and expected:
            if d.state == "pending":   # every engine came up within one poll
                d = self._set_state(d, "starting")
            if d.state != "serving" and not await self._routed(d.name, rows):
                return   # serving means reachable: wait until the gateway has loaded the routes
            if d.state != "serving":
                self.event(d.name, "serving", f"all {expected} engine(s) healthy; gateway {self.gateway.url}/d/{d.name}/v1")
            lv.served = True
            self._set_state(d, "serving", "")
            return
        if lv.served or d.state in ("serving", "degraded"):
            lv.served = True
            self._set_state(d, "degraded", f"{expected - healthy} of {expected} engine(s) not healthy")
            return
        timeout = float((d.options or {}).get("start_timeout_s") or 3600.0)
        if time.time() - lv.running_since > timeout:
            self._set_state(d, "failed", f"not every engine was healthy {timeout:g} s after the job started "
                            f"({healthy}/{expected}); engine logs in {session.log_dir}")
            await asyncio.to_thread(self._cancel, job)
            return
        self._set_state(d, "starting")

    async def _adopt_unrecorded(self, d: Deployment) -> bool:
        """A daemon stopped between submitting the deployment's job and recording its id: find the job by its
        name (which carries a nonce) and record it; whether there was one."""
        opts = d.options or {}
        name, kind = opts.get("job_name"), opts.get("backend", "local")
        if not name:
            return False
        try:
            st = await asyncio.to_thread(self.backend(kind).find_by_name, name)
        except ScepsyError:
            return False
        if st is None:
            return False
        self.store.add_job(Job(job_id=st.job_id, deployment=d.name, backend=kind, name=name, role="serve",
                               submit_time=st.submit, nodes=st.nodes, folder=str(Path(d.session_dir) / "logs"),
                               state=st.state, reason=st.reason))
        self.store.update_deployment(d.name, options={**opts, "submitting": False})
        self.event(d.name, "job", f"adopted job {st.job_id} ({name}): submitted just before the last daemon stopped, "
                   f"never recorded", job_id=st.job_id)
        return True

    async def _instances(self, d: Deployment, lv: _Live,
                         reports: dict[str, AgentReport]) -> tuple[list[InstanceRow], str]:
        """The deployment's instances as seen now (agents' reports, agent liveness, /health), and why it failed ('' if not)."""
        assert lv.config is not None
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
        for inst in lv.config.instances:
            report = reports.get(inst.node)
            got = next((i for i in report.instances if i.llm == inst.llm and i.replica == inst.replica), None) if report else None
            agent_ok = report is not None and self._agent_alive(report, now)
            state = got.state if got else "waiting"
            error = got.error if got else ""
            if report is not None and report.state == "failed" and not failed:
                failed = f"node {inst.node}: {report.error or 'the node agent failed'}"
            if report is not None and not agent_ok and report.state not in ("stopped",):
                state, error = "lost", f"the node agent on {inst.node} (pid {report.pid}) is gone"
            rows.append(InstanceRow(deployment=d.name, llm=inst.llm, replica=inst.replica, node=inst.node,
                                    gpus=list(got.gpus if got else inst.gpus), url=got.url if got else "", state=state,
                                    healthy=False, pid=got.pid if got else None, restarts=got.restarts if got else 0,
                                    error=error, updated=now))
            if got is not None and got.healthy and agent_ok and got.url:
                probes.append((len(rows) - 1, probe(got.url)))
        results = await asyncio.gather(*(p for _, p in probes))
        for (idx, _), ok in zip(probes, results):
            r = rows[idx]
            rows[idx] = dataclasses.replace(r, healthy=ok, state="healthy" if ok else "unhealthy",
                                            error="" if ok else f"{r.url}/health does not answer")
        return rows, failed

    async def _routed(self, name: str, rows: list[InstanceRow]) -> bool:
        """Whether the gateway routes to every healthy engine of the deployment (the endpoints file is
        written first; the gateway reloads it within a moment)."""
        self.write_endpoints()
        if not self.gateway.url:
            return False
        try:
            async with self._http.get(f"{self.gateway.url}/scepsy/v1/stats") as resp:
                models = (await resp.json()).get("models", {}) if resp.status == 200 else {}
        except Exception:   # a gateway that does not answer routes nothing yet
            return False
        want: dict[str, int] = {}
        for r in rows:
            want[f"{name}/{r.llm}"] = want.get(f"{name}/{r.llm}", 0) + 1
        return all(isinstance(models.get(k), dict) and models[k].get("replicas") == n for k, n in want.items())

    def _agent_alive(self, report: AgentReport, now: float) -> bool:
        if report.state in ("failed", "stopped"):
            return False
        if report.host == self.hostname:
            return pid_alive(report.pid)
        return not report_stale(report, now)

    def _write_instances(self, d: Deployment, rows: list[InstanceRow], lv: _Live) -> None:
        before = {(r.llm, r.replica): r for r in self.store.instances(d.name)}
        changed = len(before) != len(rows)
        for r in rows:
            old = before.get((r.llm, r.replica))
            key = (r.llm, r.replica)
            if old is None or (old.state, old.healthy, old.url, old.pid, old.restarts) != \
                    (r.state, r.healthy, r.url, r.pid, r.restarts):
                changed = True
            if lv.health.get(key) is not None and lv.health[key] != r.healthy:
                self.event(d.name, "instance", f"{r.llm}·{r.replica} on {r.node}: "
                           + ("healthy" if r.healthy else f"{r.state}" + (f" ({r.error})" if r.error else "")),
                           llm=r.llm, replica=r.replica, healthy=r.healthy)
            lv.health[key] = r.healthy
        if changed:
            self.store.set_instances(d.name, rows)

    async def _mark_instances_down(self, d: Deployment, session: Session, why: str) -> None:
        rows = self.store.instances(d.name)
        if any(r.healthy or r.state not in ("stopped", "lost") for r in rows):
            self.store.set_instances(d.name, [dataclasses.replace(r, healthy=False, state="stopped", error=why,
                                                                  updated=time.time()) for r in rows])
        await self._reap(session, self._live(d.name))

    async def _finish_stop(self, d: Deployment, session: Session, lv: _Live) -> None:
        await self._mark_instances_down(d, session, "stopped")
        self._set_state(d, "stopped", "")

    async def _reap(self, session: Session, lv: _Live) -> None:
        """Stop engines that outlived their agent on this host (the agent's report names each process group)."""
        if lv.reaped:
            return
        lv.reaped = True
        reports = [r for r in (await asyncio.to_thread(session.agents)).values() if r.host == self.hostname]
        if not reports:
            return
        stopped = await asyncio.to_thread(reap_engines, reports)
        if stopped:
            self.event(session.name, "reap", f"stopped {len(stopped)} engine(s) left behind by their node agent: "
                       f"process groups {', '.join(map(str, stopped))}")

    def _cancel(self, j: Job) -> None:
        try:
            self.backend(j.backend).cancel(j.job_id)
        except ScepsyError as exc:
            self.event(j.deployment, "job", f"cancelling job {j.job_id} failed: {exc}")

    # ---- routes --------------------------------------------------------------------------------
    def write_endpoints(self) -> None:
        """The gateway's endpoints file from every deployment's healthy engines (rewritten only on change)."""
        from scepsy_hpc.gateway.endpoints import Endpoints, LLMEndpoint, Replica, merge_endpoints, write_endpoints

        per: dict[str, Endpoints] = {}
        rows = self.store.instances()
        for d in self.store.deployments():
            if d.state not in ("starting", "serving", "degraded"):
                continue
            aliases = (d.options or {}).get("aliases") or {}
            keys = sorted({r.llm for r in rows if r.deployment == d.name})
            llms = {k: LLMEndpoint(served_model=k, aliases=list(aliases.get(k, [])),
                                   replicas=[Replica(url=r.url) for r in rows
                                             if r.deployment == d.name and r.llm == k and r.healthy and r.url])
                    for k in keys}
            per[d.name] = Endpoints(llms=llms)
        self.gateway.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_endpoints(self.gateway.endpoints, merge_endpoints(per, None))

    # ---- actions the API asks for --------------------------------------------------------------
    async def up(self, req: UpRequest) -> Deployment:
        """Record the deployment, prepare it (plan, place, serve.json) and submit its job."""
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
            await self._submit(req, prepared, backend)
        finally:
            self.starting.discard(req.name)
            self.wake()
        dep = self.store.get_deployment(req.name)
        assert dep is not None
        return dep

    async def _submit(self, req: UpRequest, prepared: Any, backend: ClusterBackend) -> str:
        """Record the prepared job's name (so that a daemon killed meanwhile finds it), submit, record its id."""
        d = self.store.get_deployment(req.name)
        self.store.update_deployment(req.name, plan_path=str(prepared.plan_path), spec_paths=list(prepared.spec_paths),
                                     options={**(d.options if d else {}), **req.model_dump(),
                                              "workflows": list(prepared.workflows),
                                              "aliases": {k: list(v) for k, v in prepared.aliases.items()},
                                              "job_name": prepared.job.name, "submitting": True})
        self.event(req.name, "submit", f"submitting job {prepared.job.name}: {len(prepared.config.instances)} engine(s) "
                   f"on {', '.join(prepared.job.nodes)}")
        try:
            job_id = await asyncio.to_thread(backend.submit, prepared.job)
        except ScepsyError as exc:
            self._set_state(self.store.get_deployment(req.name), "failed", f"submission failed: {exc}")
            self.store.update_deployment(req.name, desired="stopped")
            raise
        self.store.add_job(Job(job_id=job_id, deployment=req.name, backend=req.backend, name=prepared.job.name,
                               role="serve", submit_time="", walltime_end=None, nodes=",".join(prepared.job.nodes),
                               folder=str(prepared.job.log_dir), state="PENDING", reason="", exit_code="",
                               created=time.time(), updated=time.time(), ended=None))
        d = self.store.get_deployment(req.name)
        self.store.update_deployment(req.name, options={**(d.options if d else {}), "submitting": False})
        self.event(req.name, "job", f"submitted job {job_id} ({req.backend}); script beside the logs in "
                   f"{prepared.job.log_dir}", job_id=job_id)
        return job_id

    async def _resubmit(self, d: Deployment, why: str) -> None:
        """Submit the deployment's plan again (its placement, a new job), unless the circuit breaker is open:
        `max_resubmits` resubmissions within `resubmit_window_s` already."""
        opts = dict(d.options or {})
        req = UpRequest.model_validate({**{k: v for k, v in opts.items() if k in UpRequest.model_fields},
                                        "target": d.plan_path})
        now = time.time()
        history = [t for t in opts.get("resubmits", []) if now - t < req.resubmit_window_s]
        if len(history) >= req.max_resubmits:
            self.event(d.name, "breaker-open", f"{why}; {len(history)} resubmission(s) within "
                       f"{req.resubmit_window_s:g} s already: not resubmitting (circuit breaker open); fix the cause "
                       f"and `scepsy up` it again")
            self._set_state(d, "failed", f"{why}; circuit breaker open after {len(history)} resubmission(s) within "
                            f"{req.resubmit_window_s:g} s")
            return
        self.store.update_deployment(d.name, options={**opts, "resubmits": history + [now]})
        self.event(d.name, "resubmit", f"{why}: resubmitting ({len(history) + 1} of at most {req.max_resubmits} within "
                   f"{req.resubmit_window_s:g} s)")
        for stale in (Path(d.session_dir) / "agents").glob("*.json"):
            stale.unlink(missing_ok=True)
        self.live.pop(d.name, None)
        self._set_state(d, "pending")
        backend = self.backend(req.backend)
        self.starting.add(d.name)
        try:
            prepared = await asyncio.to_thread(prepare, req, Path(d.session_dir), backend,
                                               lambda m: self.event(d.name, "plan", m))
            await self._submit(req, prepared, backend)
        except ScepsyError as exc:
            self._set_state(self.store.get_deployment(d.name) or d, "failed", f"resubmission failed: {exc}")
        finally:
            self.starting.discard(d.name)

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
