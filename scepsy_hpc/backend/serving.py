"""Serving a plan as a session: the steps `scepsy up`, `status` and `down` take, as library calls.

`up` builds serve.json from the plan's placement (`serve_config`), checks the session is not already up
(`claim_session`), writes the session's files (`write_serve_files`), submits, waits until every node
agent reports ready (`wait_ready`) and watches the job; `status` reads the session
(`session_status`); `down` stops the `up` process and makes sure the job left the queue (`take_down`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from scepsy_hpc.backend.base import ClusterBackend
from scepsy_hpc.backend.records import ServeConfig, ServeInstance
from scepsy_hpc.backend.session import Session
from scepsy_hpc.engine.adapters import EngineLaunch, check_launch, parse_prefix
from scepsy_hpc.engine.supervisor import is_healthy, pid_alive
from scepsy_hpc.errors import EngineError, ScepsyError, SlurmError, SpecError
from scepsy_hpc.spec.placement_entry import PlacementEntry
from scepsy_hpc.spec.records import PRIVATE, write_atomic

HEALTH_TIMEOUT_S = {"sim": 120.0, "vllm": 1800.0, "sglang": 1800.0}


def make_backend(kind: str, root: Path) -> ClusterBackend:
    """The ClusterBackend called `kind` (`slurm`, else the local one, keeping its jobs under `root`)."""
    if kind == "slurm":
        from scepsy_hpc.backend.slurm import SlurmBackend

        return SlurmBackend()
    from scepsy_hpc.backend.local import LocalBackend

    return LocalBackend(root / ".local-jobs")


def serve_config(plan: Any, wf: Any, models: Mapping[str, Any], gpus: Mapping[str, Any],
                 placement: Sequence[PlacementEntry], *, engine: str, engine_args: Sequence[str] = (),
                 launch_prefix: str = "", health_timeout_s: float | None = None, time_scale: float = 1.0,
                 seed: int = 0) -> ServeConfig:
    """serve.json: every engine of the placement with its launch fields (checked)."""
    from scepsy_hpc.perf.model import EngineConfig
    from scepsy_hpc.spec.workflow import resolve_model

    instances = []
    for p in placement:
        alloc = plan.allocation[p.llm]
        ref = wf.llms[p.llm].model
        if engine == "sim" and not isinstance(ref, str):
            raise SpecError(f"LLM {p.llm!r} has an inline model; the sim engine needs a model of the catalog by name")
        model = resolve_model(wf, p.llm, models)
        seqs = alloc.max_num_seqs or EngineConfig(model, gpus[plan.gpus.type], tp=alloc.tp,
                                                  gpu_frac=alloc.gpu_frac).max_num_seqs
        launch = EngineLaunch(engine=engine, model=ref if isinstance(ref, str) else model.hf_id, hf_id=model.hf_id,
                              served_name=p.llm, gpu=plan.gpus.type, tp=alloc.tp, gpu_frac=alloc.gpu_frac,
                              mem_frac=float(p.mem_frac_at(alloc.gpu_frac)), max_num_seqs=int(seqs), port=p.port,
                              time_scale=time_scale, seed=seed, extra_args=tuple(engine_args))
        check_launch(launch)
        instances.append(ServeInstance(llm=p.llm, replica=p.replica, node=p.node, gpus=list(p.gpus),
                                       gpu_frac=alloc.gpu_frac, mps_pct=p.mps_pct_at(alloc.gpu_frac), port=launch.port,
                                       launch=launch))
    return ServeConfig(engine=engine, launch_prefix=parse_prefix(launch_prefix),
                       health_timeout_s=health_timeout_s or HEALTH_TIMEOUT_S[engine], instances=instances)


def claim_session(session: Session, backend: ClusterBackend) -> None:
    """Refuse a session whose job still runs; clear what a previous `up` left for the agents and the gateway."""
    prev = session.info()
    if prev.job_id and prev.state in ("starting", "serving"):
        try:
            alive = backend.status(prev.job_id).active
        except ScepsyError:
            alive = False
        if alive:
            raise SpecError(f"session {session.name!r} is already up (job {prev.job_id}); `scepsy down {session.name}` "
                            f"first, or --name another")
    session.dir.mkdir(parents=True, exist_ok=True)
    for stale in list((session.dir / "agents").glob("*.json")) + [session.endpoints_path]:
        stale.unlink(missing_ok=True)


def write_serve_files(session: Session, config: ServeConfig, plan_path: Path) -> None:
    """serve.json for the agents, and a copy of the plan served (unless it is the session's own)."""
    session.write_serve_config(config)
    copy = session.dir / "plan.yaml"
    if plan_path.resolve() != copy.resolve():
        write_atomic(copy, plan_path.read_text(), mode=PRIVATE)


def placement_nodes(placement: Sequence[PlacementEntry]) -> dict[str, set[int]]:
    """The GPU indices the placement uses on each node."""
    per_node: dict[str, set[int]] = {}
    for p in placement:
        per_node.setdefault(p.node, set()).update(p.gpus)
    return per_node


async def wait_ready(session: Session, backend: ClusterBackend, job_id: str, config: ServeConfig, timeout_s: float,
                     say: Callable[[str], None]) -> None:
    """Until every node agent reports ready; EngineError naming the log of an engine that failed."""
    nodes = sorted({i.node for i in config.instances})
    deadline = time.monotonic() + timeout_s
    said = ""
    while True:
        agents = session.agents()
        failed = [a for a in agents.values() if a.state == "failed"]
        if failed:
            raise EngineError(f"node {failed[0].node}: {failed[0].error or 'the agent failed'}")
        if all(n in agents and agents[n].state == "ready" for n in nodes):
            return
        st = await asyncio.to_thread(backend.status, job_id)
        if not st.active:
            out = session.log_dir / f"job-{job_id}.out"
            raise SlurmError(f"job {job_id} ended ({st.state}{', ' + st.reason if st.reason else ''}) before its engines were "
                             f"healthy; see {out if out.exists() else session.log_dir}")
        healthy = sum(1 for a in agents.values() for i in a.instances if i.healthy)
        now = f"job {job_id} {st.state}{' (' + st.reason + ')' if st.reason and st.state == 'PENDING' else ''}: " \
              f"{healthy}/{len(config.instances)} engine(s) healthy"
        if now != said:
            say(now)
            said = now
        if time.monotonic() > deadline:
            raise EngineError(f"not every engine was healthy after {timeout_s:g} s ({now}); engine logs in {session.log_dir}")
        await asyncio.sleep(0.5)


def session_status(session: Session, backend: ClusterBackend) -> dict[str, Any]:
    """The session as `status --json` prints it."""
    info = session.info()
    job: dict[str, Any] = {}
    if info.job_id:
        try:
            st = backend.status(info.job_id)
            job = {"job_state": st.state, "job_reason": st.reason, "job_nodes": st.nodes}
        except ScepsyError as exc:
            job = {"job_state": "ERROR", "job_reason": str(exc)}
    instances = []
    for node, report in session.agents().items():
        for i in report.instances:
            instances.append({"llm": i.llm, "replica": i.replica, "node": node, "gpus": i.gpus,
                              "cuda_visible_devices": i.cuda_visible_devices, "url": i.url, "state": i.state,
                              "healthy": i.healthy and is_healthy(i.url, timeout_s=2.0), "pid": i.pid, "log": i.log,
                              "error": i.error})
    instances.sort(key=lambda i: (i["llm"], i["replica"]))
    gw = info.gateway_url
    return {"name": session.name, "state": info.state, "backend": info.backend, "job_id": info.job_id, **job,
            "gateway_url": gw, "gateway_healthy": is_healthy(gw, timeout_s=2.0), "workflow": info.workflow,
            "engine": info.engine, "instances": instances, "session_dir": str(session.dir), "script": info.script,
            "error": info.error}


def take_down(session: Session, backend: ClusterBackend, timeout_s: float) -> str | None:
    """Stop the `up` process (it cancels its job), make sure the job left the queue, mark the session down; the job id.

    SlurmError when the job is still queued `timeout_s` after the cancel."""
    info = session.info()
    pid = info.up_pid
    if pid and pid != os.getpid() and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    job_id = info.job_id
    gone = backend.cancel_and_wait(job_id, timeout_s) if job_id else True
    session.update(state="down")
    if not gone:
        raise SlurmError(f"job {job_id} is still in the queue {timeout_s:g} s after scancel; check `squeue -j {job_id}`")
    return job_id
