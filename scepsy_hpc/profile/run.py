"""Profiling a workflow's LLMs over a grid of (tp, gpu_frac): which configurations, and running them.

Backends: `synthetic` sweeps in the simulator (the performance model); `local` starts one simulated
engine server per configuration on this machine and sweeps it over HTTP, exactly as a real engine
is profiled (Slurm array jobs come with the Slurm backend). Engines sit above profiling in the
layers, so the caller hands `run_local` the function that starts one (`EngineStarter`). Every configuration writes one profile
file; one that exists already is skipped (resumable) unless `force`.
"""

from __future__ import annotations

import datetime as _dt
import tempfile
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from scepsy_hpc import __version__
from scepsy_hpc.errors import ScepsyError
from scepsy_hpc.perf.fit import check_fit
from scepsy_hpc.perf.model import EngineConfig
from scepsy_hpc.profile.synthetic import capacity_guess, synthetic_profile
from scepsy_hpc.profile.sweep import FRACTIONS, sweep
from scepsy_hpc.profile.table import ProfileTable, profile_filename, save_profile
from scepsy_hpc.spec.catalog import GPUSpec, ModelSpec
from scepsy_hpc.spec.workflow import Workflow, resolve_model

LAG_RETRIES = 3
WALL_CALLS_PER_S = 50.0  # streamed calls per wall second one local engine and the replayer keep honest on 2 CPUs


@dataclass(frozen=True)
class Job:
    """One configuration to profile."""

    llm: str
    model_name: str
    tp: int
    gpu_frac: float
    path: Path
    skip: str | None = None  # why it is not profiled (does not fit, already done)


# start_engine(job, gpu_name, time_scale, log_dir, seed): a simulated engine serving the job's
# configuration (served as the job's LLM), pacing `time_scale`, logging under `log_dir`; a context
# manager that yields its base URL and stops it on exit.
EngineStarter = Callable[[Job, str, float, Path, int], AbstractContextManager[str]]


def plan_jobs(wf: Workflow, models: Mapping[str, ModelSpec], gpus: Mapping[str, GPUSpec], gpu_name: str,
              llms: Sequence[str], tps: Sequence[int], fracs: Sequence[float], out_dir: Path, force: bool) -> list[Job]:
    """Every (llm, tp, frac) asked for; fractions apply to tp=1 only (a TP group holds whole GPUs)."""
    jobs = []
    for llm in llms:
        model = resolve_model(wf, llm, models)
        name = wf.llms[llm].model if isinstance(wf.llms[llm].model, str) else llm
        for tp in tps:
            for f in (fracs if tp == 1 else (1.0,)):
                cfg = EngineConfig(model, gpus[gpu_name], tp=tp, gpu_frac=f)
                probe = ProfileTable(llm, name, gpu_name, tp, f, 1.0, ())
                path = out_dir / profile_filename(probe)
                skip = None
                try:
                    check_fit(cfg, label=f"{llm} at tp={tp}, gpu_frac={f:g}")
                except ScepsyError as e:
                    skip = f"does not fit: {e}"
                if skip is None and path.exists() and not force:
                    skip = "already profiled (use --force to redo)"
                if not any(j.llm == llm and j.tp == tp and j.gpu_frac == f for j in jobs):
                    jobs.append(Job(llm, name, tp, f, path, skip))
    return jobs


def run_synthetic(job: Job, model: ModelSpec, gpu: GPUSpec, gpu_name: str, mix: Sequence[tuple[int, int]],
                  n_calls: int, seed: int, workflow: str, fractions: Sequence[float] = FRACTIONS) -> ProfileTable:
    """Profile one configuration in the simulator."""
    cfg = EngineConfig(model, gpu, tp=job.tp, gpu_frac=job.gpu_frac)
    t = synthetic_profile(job.llm, job.model_name, gpu_name, cfg, mix, n_calls=n_calls, seed=seed, workflow=workflow,
                          fractions=fractions)
    return replace(t, command=f"scepsy profile {workflow} --backend synthetic")


def run_local(job: Job, model: ModelSpec, gpu: GPUSpec, gpu_name: str, mix: Sequence[tuple[int, int]],
              n_calls: int, seed: int, workflow: str, time_scale: float | None, log_dir: Path | None,
              on_point: Callable[[float], None] | None = None, start_frac: float = 0.1,
              fractions: Sequence[float] = FRACTIONS, *, start_engine: EngineStarter) -> ProfileTable:
    """Profile one configuration against a local simulated engine server (`start_engine`), over HTTP."""
    from scepsy_hpc.profile.replay import EngineLagError

    cfg = EngineConfig(model, gpu, tp=job.tp, gpu_frac=job.gpu_frac)
    guess = capacity_guess(cfg, mix)
    # Pace the engine so that even at saturation it sees few enough calls per wall second to keep
    # its time scale on a small machine; if it still falls behind, slow it down and start over.
    scale = max(time_scale or 0.0, guess / WALL_CALLS_PER_S)
    horizon_s = 3.0 * n_calls / guess
    logs = log_dir or Path(tempfile.mkdtemp(prefix="scepsy-profile-"))
    for attempt in range(LAG_RETRIES + 1):
        try:
            res = _sweep_local(start_engine, job, gpu_name, mix, n_calls, seed, scale, horizon_s, guess, logs, on_point,
                               start_frac, fractions)
            break
        except EngineLagError as e:
            if attempt == LAG_RETRIES:
                raise EngineLagError(f"{e}; still behind at time scale {scale:g}: pass a larger --time-scale") from None
            scale *= 2.0
    p_mean = sum(m[0] for m in mix) / len(mix)
    o_mean = sum(m[1] for m in mix) / len(mix)
    return ProfileTable(
        llm=job.llm, model=job.model_name, gpu=gpu_name, tp=job.tp, gpu_frac=job.gpu_frac,
        capacity_rps=res.capacity_rps, points=res.points, source="measured", engine="scepsy-sim",
        engine_version=__version__, max_num_seqs=cfg.max_num_seqs,
        workload={"workflow": workflow, "calls": len(mix), "prompt_tokens_mean": round(p_mean, 1),
                  "output_tokens_mean": round(o_mean, 1), "calls_per_point": n_calls, "time_scale": scale,
                  "seed": seed},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=f"scepsy profile {workflow} --backend local")


def _sweep_local(start_engine: EngineStarter, job: Job, gpu_name: str, mix, n_calls: int, seed: int, scale: float,
                 horizon_s: float, guess: float, logs: Path, on_point, start_frac: float, fractions: Sequence[float]):
    from scepsy_hpc.profile.replay import measure_http

    with start_engine(job, gpu_name, scale, logs, seed) as url:
        def measure(rate: float):
            n = max(min(n_calls, 100), min(n_calls, int(rate * horizon_s)))
            p = measure_http(url, job.llm, mix, n, time_scale=scale, seed=seed)(rate)
            if on_point is not None:
                on_point(rate)
            return p
        return sweep(measure, max(guess * start_frac, 1e-4), fractions=tuple(fractions), bracket=True)


def save(t: ProfileTable, out_dir: Path) -> Path:
    """Write one profile."""
    return save_profile(t, out_dir)
