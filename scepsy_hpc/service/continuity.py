"""Keeping every node of a deployment's plan served: the part of the daemon's cycle that replaces jobs.

A deployment is served by one job per node of its plan (a *unit*, `service/units.py`). Each cycle the
daemon (which mixes `Continuity` in) asks three things of every live deployment:
- **units** (`_cover_units`): a unit no live job serves gets a job: lost jobs (walltime, scancel,
  NODE_FAIL, preemption, an engine failed past its restarts) are placed anew on a free node, failed,
  down or drained nodes excluded, behind the circuit breaker; a unit drained by a cut-over without
  room gets its replacement;
- **cut-overs** (`_cutovers`): a job near its walltime end (the lead: observed queue wait + measured
  time to healthy + margin), preempted, or on an excluded node is replaced: with room the replacement
  serves first and the old job is drained then; without room node by node, break before make;
- **drains** (`_drains`): a drained job is cancelled once the gateway has no call in flight on its
  engines, or its grace passed.
Every decision is an event with its reason. What it keeps in memory per deployment (`Live`) can be
rebuilt from the state: a daemon killed in the middle of a cut-over completes it after a restart.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scepsy_hpc.backend.records import ServeConfig
from scepsy_hpc.backend.session import Session
from scepsy_hpc.errors import ScepsyError
from scepsy_hpc.service.deploy import JobTemplate, job_name
from scepsy_hpc.service.keys import engine_secret
from scepsy_hpc.service.paths import mkdir_private
from scepsy_hpc.service.state import Deployment, InstanceRow, Job, StateStore
from scepsy_hpc.service.units import (DEFAULT_HEALTHY_S, DEFAULT_QUEUE_S, Lead, choose_node, gpus_needed, llms_of,
                                      part_dir, unit_config, units)

NO_ROOM_REPEAT_S = 60.0       # "no node can take it" is said again at most this often
CUTOVER_RETRY_S = 30.0        # after a replacement failed, the next attempt waits this long
SIGNAL_LEAD_S = 120.0         # jobs are sent USR1 this long before their walltime ends (backend.templates.SIGNAL)
NODE_CHECK_S = 30.0           # nodes under running jobs are checked (drained, down) this often, for every deployment
ABANDONED = "abandoned"       # a job's role once the daemon gave up on it (cancelled again and again until it is gone)
DRAIN_MIN_S = 1.0             # a drained job is cancelled no sooner (the gateway reloads its endpoints first)


@dataclass
class Live:
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
    slow_probes: dict[tuple[str, str, int], int] = field(default_factory=dict)   # /health timeouts in a row


def nodes_of(j: Job) -> list[str]:
    """The nodes a job runs on (its hostlist expanded)."""
    from scepsy_hpc.spec.hostlist import expand_hostlist

    try:
        return expand_hostlist(j.nodes) if j.nodes else []
    except ValueError:
        return [j.nodes]


def clock(ts: float) -> str:
    """A Unix time as the login node's local clock time (HH:MM:SS)."""
    return time.strftime("%H:%M:%S", time.localtime(ts))


class Continuity:
    """The daemon's re-placement, cut-over and drain steps (mixed into `Daemon`, which provides the state
    store, events, backends, the gateway's stats and the deployment's own steps these call)."""

    store: StateStore
    live: dict[str, Live]
    _node_cache: dict[tuple[str, str | None], tuple[float, Any]]

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

    # ---- units: every node of the plan served by a live job -------------------------------------
    async def _cover_units(self, d: Deployment, lv: Live, live: list[Job]) -> bool:
        """Submit a job for every unit no live job serves: never submitted, drained by a cut-over without room,
        or lost (its job ended: walltime, scancel, a failed node, preemption). False when the deployment failed."""
        assert lv.shape is not None
        covered: set[str] = set()
        for j in live:
            if j.role != ABANDONED:
                covered |= set(j.unit.split(",")) if j.unit else set(units(lv.shape))
        jobs = self.store.jobs(d.name)
        for unit in units(lv.shape):
            if unit in covered:
                continue
            gone = [j for j in jobs if (j.ended is not None or j.role == ABANDONED)
                    and unit in (j.unit.split(",") if j.unit else units(lv.shape))]
            last = gone[-1] if gone else None
            if last is None:
                await self._submit_unit(d, lv, unit, why="no job serves it yet")
                continue
            if last.drain_started is not None:   # a cut-over without room for both: the drained job is gone now
                await self._submit_unit(d, lv, unit, replaces=last.job_id, cutover=True,
                                        why=f"cut-over: job {last.job_id} was drained and has ended")
                continue
            why = (f"job {last.job_id} ended: {last.state}" if last.ended is not None else f"job {last.job_id} abandoned") \
                + (f" ({last.reason})" if last.reason else "")
            reports = await asyncio.to_thread(self._part(d, last).agents)
            bad = next((r for r in reports.values() if r.state == "failed" and r.job_id in ("", last.job_id)), None)
            if bad is not None:   # the agent that took the job down says why
                why += f"; node {bad.node}: {bad.error or 'the node agent failed'}"
                if not lv.served and d.state not in ("serving", "degraded"):
                    await self._fail(d, self.store.jobs(d.name, live_only=True), why)   # a mistake to fix, not a loss
                    return False
            if last.state in ("NODE_FAIL", "BOOT_FAIL") or (last.state == "LOST" and "agent" in last.reason):
                for node in nodes_of(last):
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
            self._exclude_bad(d, nodes, nodes_of(last), f"job {last.job_id} on it ended {last.state}")
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

    async def _submit_unit(self, d: Deployment, lv: Live, unit: str, *, why: str, replaces: str = "",
                           cutover: bool = False, count: bool = False, node: str | None = None,
                           nodes: list[Any] | None | bool = False) -> str | None:
        """Submit a job for `unit` on a free node (`node` if given; chosen among `nodes`, read now if not given);
        its id, or None when no node can take it now."""
        assert lv.shape is not None
        d = self.store.get_deployment(d.name) or d
        opts = d.options or {}
        if node is None:
            live_nodes = {n for j in self.store.jobs(d.name, live_only=True) for n in nodes_of(j)}
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
        secret = engine_secret()   # every job its own: a replacement never shares its predecessor's
        config = unit_config(lv.shape, unit, node).model_copy(update={"engine_secret": secret})
        session = Session(part)
        mkdir_private(part)
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
                               state="PENDING", session_dir=str(part), unit=unit, replaces=replaces,
                               engine_secret=secret))
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
                try:   # the secret is in the job's serve.json, written before it was submitted
                    secret = (await asyncio.to_thread(Session(Path(info["session_dir"])).serve_config)).engine_secret
                except (ScepsyError, OSError):
                    secret = None
                self.store.add_job(Job(job_id=st.job_id, deployment=d.name, backend=kind, name=name,
                                       role="replacement" if info.get("replaces") else "serve",
                                       submit_time=st.submit, nodes=st.nodes or info.get("node", ""),
                                       folder=str(Path(info["session_dir"]) / "logs"), state=st.state, reason=st.reason,
                                       session_dir=info["session_dir"], unit=info.get("unit", ""),
                                       replaces=info.get("replaces", ""), engine_secret=secret or ""))
                self.event(d.name, "job", f"adopted job {st.job_id} ({name}): submitted just before the last daemon "
                           "stopped, never recorded", job_id=st.job_id)
                adopted = True
            else:
                self.event(d.name, "job", f"job {name} was being submitted when the last daemon stopped and the backend "
                           "has no such job: submitting again if it is still needed")
            self._drop_pending(d.name, name)
        return adopted

    # ---- cut-overs -------------------------------------------------------------------------------
    async def _cutovers(self, d: Deployment, lv: Live, live: list[Job], rows: list[InstanceRow]) -> None:
        """Replace jobs before they end: their walltime is near, their agent was warned (walltime signal,
        preemption), or their node is being drained. With room, make before break (the replacement serves
        first, then the old job is drained); without, one node at a time, break before make."""
        opts = d.options or {}
        if not opts.get("cutover", True) or d.state not in ("serving", "degraded") or not lv.served:
            return
        now = time.time()
        by_id = {j.job_id: j for j in live}
        replaced = {j.replaces for j in live if j.replaces}
        def serving(job: Job) -> bool:   # every engine of the job takes calls
            mine = [x for x in rows if x.job_id == job.job_id]
            config = lv.configs.get(job.job_id)
            return config is not None and len(mine) == len(config.instances) and all(x.routed for x in mine)

        for r in live:   # replacements of jobs still live: drain the old one once the new one serves
            if not r.replaces or r.replaces not in by_id:
                continue
            old = by_id[r.replaces]
            if old.role == ABANDONED:
                continue
            if old.drain_started is None and serving(r) and await self._routed(d.name, rows):
                self.store.update_job(old.backend, old.job_id, drain_started=now)
                self.event(d.name, "drain", f"job {r.job_id} serves node {r.unit}'s engines on {r.nodes}: draining job "
                           f"{old.job_id} (no new calls; calls in flight get {float(opts.get('drain_grace_s', 120)):g} s)",
                           job_id=old.job_id, replacement=r.job_id)
        for j in self.store.jobs(d.name):   # replacements that ended before their old job
            if j.ended is not None and j.replaces and j.replaces in by_id and by_id[j.replaces].drain_started is None \
                    and j.job_id not in lv.rolled_back:
                lv.rolled_back.add(j.job_id)
                lv.retry_at[j.replaces] = now + CUTOVER_RETRY_S
                lv.cutover_said.discard(j.replaces)   # its cut-over may start again
                self.event(d.name, "cutover-rollback", f"replacement job {j.job_id} ended ({j.state}) before it served; "
                           f"job {j.replaces} serves on; trying again in {CUTOVER_RETRY_S:g} s", job_id=j.job_id)
        if any(j.started is not None for j in live):   # nodes drained or down under running jobs
            nodes = await self._nodes(d, max_age_s=NODE_CHECK_S)
            for j in live:
                if j.drain_started is None and j.job_id not in replaced:
                    self._exclude_bad(d, nodes, nodes_of(j), f"job {j.job_id} runs on it")
            opts = (self.store.get_deployment(d.name) or d).options or {}
        lead = self.lead(d)
        due: list[tuple[Job, str]] = []
        warned = {x.job_id for x in rows if "draining" in x.error}
        sequential = lv.no_room and len(units(lv.shape)) > 1
        for j in live:
            if j.job_id in replaced or j.drain_started is not None or j.started is None or j.replaces in by_id \
                    or j.role == ABANDONED:
                continue
            if not j.unit:   # a job of every node, submitted by an older scepsy: its nodes are placed anew when it ends
                continue
            if now < lv.retry_at.get(j.job_id, 0.0):
                continue
            if j.walltime_end is not None and now >= j.walltime_end - lead.total_s * (len(units(lv.shape)) if sequential else 1):
                due.append((j, f"job {j.job_id} ends at {clock(j.walltime_end)} (in {max(0.0, j.walltime_end - now):.0f} s; "
                               f"lead {lead.total_s:.0f} s = queue {lead.queue_s:.0f} + healthy {lead.healthy_s:.0f} + "
                               f"margin {lead.margin_s:.0f})"))
            elif j.job_id in warned and (j.walltime_end is None or j.walltime_end - now > SIGNAL_LEAD_S + 60):
                due.append((j, f"job {j.job_id} was told by Slurm that it ends soon, well before its walltime "
                               "(preemption)"))
            elif any(n in (opts.get("excluded_nodes") or {}) for n in nodes_of(j)):
                due.append((j, f"job {j.job_id} runs on an excluded node ({j.nodes})"))
        if not due:
            return
        covered = {u for x in live for u in (x.unit.split(",") if x.unit else units(lv.shape))}
        # a node mid-replacement: drained and not yet ended, its unit uncovered, or a replacement not yet serving
        busy = (any(x.drain_started is not None for x in live) or any(x.replaces in by_id for x in live)
                or not set(units(lv.shape)) <= covered
                or any(x.replaces and x.role != ABANDONED and not serving(x) for x in live))
        for j, why in due:
            if j.job_id in lv.cutover_said:
                continue
            unit = j.unit
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

    async def _drains(self, d: Deployment, lv: Live) -> None:
        """Cancel each drained job once the gateway has no call in flight on its engines (or its grace passed)."""
        live = [j for j in self.store.jobs(d.name, live_only=True) if j.drain_started is not None]
        if not live:
            return
        grace = float((d.options or {}).get("drain_grace_s", 120.0))
        self.write_endpoints()   # the drained engines out of the file before the gateway is asked about them
        stats = await self._gateway_stats()
        states = [rs for m in (stats.get("models") or {}).values() if isinstance(m, dict)
                  for rs in m.get("replica_states") or [] if isinstance(rs, dict)]
        rows = self.store.instances(d.name)
        now = time.time()
        for j in live:
            if j.job_id in lv.drain_cancelled:
                continue
            urls = {r.url for r in rows if r.job_id == j.job_id and r.url}
            mine = [rs for rs in states if rs.get("url") in urls]
            # in flight: calls on its engines the gateway still counts (None: the gateway did not say)
            in_flight = sum(int(rs.get("outstanding") or 0) for rs in mine) if states else None
            routed = any(rs.get("active") for rs in mine)   # the gateway has not loaded the file without them yet
            waited = now - j.drain_started
            if waited < DRAIN_MIN_S or ((routed or in_flight != 0) and waited < grace):
                continue
            lv.drain_cancelled.add(j.job_id)
            self.event(d.name, "drained", f"job {j.job_id} drained in {waited:.1f} s"
                       + (f" ({in_flight} call(s) still in flight after the {grace:g} s grace)" if in_flight else "")
                       + "; cancelling it", job_id=j.job_id, in_flight=in_flight, waited_s=round(waited, 3))
            await asyncio.to_thread(self._cancel, j)

    def _note_cutover_done(self, d: Deployment, lv: Live, rows: list[InstanceRow]) -> None:
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

