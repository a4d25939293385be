"""Profiling as Slurm array jobs: one submitit array per tp degree, each task holding tp GPUs.

A task (`run_task`, a plain picklable function, so submitit runs it on the node) starts its engine on
the task's CUDA_VISIBLE_DEVICES — a simulated one, or vLLM/SGLang with dummy weights — waits for
/health, replays the recorded calls at the saturation sweep's rates, writes one profile file and
stops the engine. The same function runs in-process for the local backend.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from scepsy_hpc.errors import SlurmError
from scepsy_hpc.profile.run import Job


@dataclass(frozen=True)
class ProfileTask:
    """Everything one array task needs (pickled by submitit)."""

    job: Job
    model: Any                 # ModelSpec
    gpu: Any                   # GPUSpec
    gpu_name: str
    mix: tuple[tuple[int, int], ...]
    n_calls: int
    seed: int
    workflow: str
    engine: str = "sim"
    time_scale: float | None = None
    fractions: tuple[float, ...] = ()
    start_frac: float = 0.1
    out_dir: str = "profiles"
    log_dir: str = "."
    launch_prefix: str = ""
    health_timeout_s: float = 1800.0


@contextlib.contextmanager
def sim_engine(job: Job, gpu_name: str, time_scale: float, log_dir: Path, seed: int) -> Iterator[str]:
    """A local simulated engine serving `job`'s configuration (profile.run.EngineStarter): its base URL."""
    from scepsy_hpc.engine.local import SimEngineSpec, sim_engines

    spec = SimEngineSpec(model=job.model_name, gpu=gpu_name, tp=job.tp, gpu_frac=job.gpu_frac, served_model_name=job.llm)
    with sim_engines([spec], time_scale, log_dir, seed=seed) as (engine,):
        yield engine.url


def run_task(task: ProfileTask) -> dict[str, Any]:
    """Profile one configuration on this node's GPUs and save it; its summary."""
    from scepsy_hpc.profile.run import run_local, save

    if task.engine == "sim":
        t = run_local(task.job, task.model, task.gpu, task.gpu_name, list(task.mix), task.n_calls, task.seed, task.workflow,
                      task.time_scale, Path(task.log_dir), start_frac=task.start_frac, fractions=task.fractions,
                      start_engine=sim_engine)
        t = replace(t, command=f"scepsy profile {task.workflow} --engine sim")
    else:
        t = _run_real(task)
    path = save(t, Path(task.out_dir))
    return {"llm": t.llm, "tp": t.tp, "gpu_frac": t.gpu_frac, "capacity_rps": t.capacity_rps, "points": len(t.points),
            "path": str(path), "source": t.source, "node": os.environ.get("SLURMD_NODENAME", ""),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def _run_real(task: ProfileTask) -> Any:
    """vLLM or SGLang with dummy weights on the task's GPUs (MPS when profiling a fraction)."""
    import datetime as dt

    from scepsy_hpc.engine.adapters import EngineLaunch, engine_argv, engine_command, engine_env
    from scepsy_hpc.engine.supervisor import free_port, start, wait_healthy
    from scepsy_hpc.perf.model import EngineConfig
    from scepsy_hpc.profile.replay import measure_http
    from scepsy_hpc.profile.synthetic import capacity_guess
    from scepsy_hpc.profile.sweep import sweep
    from scepsy_hpc.profile.table import ProfileTable
    from scepsy_hpc.spec.placement_entry import default_mem_frac

    job = task.job
    cfg = EngineConfig(task.model, task.gpu, tp=job.tp, gpu_frac=job.gpu_frac)
    launch = EngineLaunch(engine=task.engine, model=job.model_name, hf_id=task.model.hf_id, served_name=job.llm,
                          gpu=task.gpu_name, tp=job.tp, gpu_frac=job.gpu_frac,
                          mem_frac=round(default_mem_frac(job.gpu_frac), 4), max_num_seqs=cfg.max_num_seqs, port=free_port(),
                          host="127.0.0.1", dummy_weights=True)
    visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g] or [str(i) for i in range(job.tp)]
    env = {**os.environ, **engine_env(launch, visible[:job.tp], max(1, round(100 * job.gpu_frac)))}
    log = Path(task.log_dir) / f"engine-{job.llm}-tp{job.tp}-f{job.gpu_frac:g}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    mps = job.gpu_frac < 1
    if mps:
        pipe = Path(task.log_dir) / f"mps-{os.getpid()}"
        env.update(CUDA_MPS_PIPE_DIRECTORY=str(pipe / "pipe"), CUDA_MPS_LOG_DIRECTORY=str(pipe / "log"))
        for d in ("pipe", "log"):
            (pipe / d).mkdir(parents=True, exist_ok=True)
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True, timeout=30)
    argv = ["bash", "-c", engine_command(launch, task.launch_prefix)] if task.launch_prefix else engine_argv(launch)
    url = f"http://127.0.0.1:{launch.port}"
    proc = None
    try:
        proc = start(argv, log, what=f"{task.engine} for {job.llm} tp={job.tp} f={job.gpu_frac:g}", health=url, env=env,
                     append=True, missing_hint=f"install {task.engine} there, or give a --launch-prefix that provides "
                                               f"it (module load …, apptainer exec --nv IMAGE)")
        wait_healthy([proc], task.health_timeout_s, poll_s=1.0)
        res = sweep(measure_http(url, job.llm, list(task.mix), task.n_calls, seed=task.seed),
                    max(capacity_guess(cfg, task.mix) * task.start_frac, 1e-4), fractions=task.fractions, bracket=True)
    finally:
        if proc is not None:
            proc.stop(grace_s=30.0)
        if mps:
            subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env=env, timeout=30, check=False)
    return ProfileTable(llm=job.llm, model=job.model_name, gpu=task.gpu_name, tp=job.tp, gpu_frac=job.gpu_frac,
                        capacity_rps=res.capacity_rps, points=res.points, source="measured", engine=task.engine,
                        engine_version="", max_num_seqs=cfg.max_num_seqs,
                        workload={"workflow": task.workflow, "calls": len(task.mix), "calls_per_point": task.n_calls,
                                  "seed": task.seed, "weights": "dummy"},
                        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        command=f"scepsy profile {task.workflow} --engine {task.engine}")


def walltime_minutes(text: str) -> int:
    """Slurm walltime (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) in whole minutes, rounded up."""
    from scepsy_hpc.backend.templates import walltime_seconds

    return max(1, -(-walltime_seconds(text) // 60))


@dataclass
class ArrayJob:
    """One submitted array (one tp degree) and its tasks in array order."""

    tp: int
    job_id: str
    tasks: list[ProfileTask]
    jobs: list[Any]   # submitit jobs, for their log paths


def submit_arrays(tasks: Sequence[ProfileTask], folder: Path, *, partition: str | None, account: str | None,
                  qos: str | None, time_limit: str, gres_type: str | None) -> list[ArrayJob]:
    """One submitit array per tp; each task holds tp GPUs (GRES) on one node."""
    import submitit

    from scepsy_hpc.backend.base import check_name

    by_tp: dict[int, list[ProfileTask]] = {}
    for t in tasks:
        by_tp.setdefault(t.job.tp, []).append(t)
    extra = {k: check_name(v, k) for k, v in (("account", account), ("qos", qos)) if v}
    arrays = []
    for tp, group in sorted(by_tp.items()):
        ex = submitit.SlurmExecutor(folder=folder / f"tp{tp}" / "%A")
        kind = f"{check_name(gres_type, 'GRES type')}:" if gres_type else ""
        params: dict[str, Any] = dict(job_name=f"scepsy-profile-tp{tp}", gres=f"gpu:{kind}{tp}", time=walltime_minutes(time_limit),
                                      array_parallelism=len(group), ntasks_per_node=1, additional_parameters=extra)
        if partition:
            params["partition"] = check_name(partition, "partition")
        ex.update_parameters(**params)
        try:
            jobs = ex.map_array(run_task, group)
        except Exception as exc:   # submitit raises its own errors (or CalledProcessError) for a refused sbatch
            raise SlurmError(f"sbatch refused the profiling array for tp={tp}: {exc}") from None
        arrays.append(ArrayJob(tp, jobs[0].job_id.split("_")[0], list(group), jobs))
    return arrays


def watch_arrays(arrays: Sequence[ArrayJob], backend: Any, on_progress: Callable[[int, int], None],
                 poll_s: float = 1.0) -> dict[str, Any]:
    """Poll every task until all are final; {task job id ('ID_i', or 'ID' for a lone task): JobStatus}."""
    total = sum(len(a.tasks) for a in arrays)
    while True:
        states: dict[str, Any] = {}
        for a in arrays:
            states.update(backend.tasks(a.job_id))
        # submitit submits a single task as a plain job: key every task by its own submitit job id
        done = sum(1 for a in arrays for sj in a.jobs if sj.job_id in states and not states[sj.job_id].active)
        on_progress(done, total)
        if done == total:
            return states
        time.sleep(poll_s)
