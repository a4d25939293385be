"""`scepsy profile`: profile a workflow's LLMs over a (tp, gpu_frac) grid, one file per configuration."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from typing import Any

from scepsy_hpc.commands.argtypes import (count, gpu_count, float_list, fraction, int_list, name_list, non_negative_int, open_fraction,
                                          positive_float, walltime)
from scepsy_hpc.commands.common import jsonable, make_console, resolve_input
from scepsy_hpc.errors import SlurmError, SpecError
from scepsy_hpc.planning.request import DEFAULT_SAMPLES


def add_arguments(sub: Any) -> None:
    """The `profile` subcommand's arguments."""
    pf = sub.add_parser("profile", help="profile each LLM's latency vs. load at several (tp, gpu_frac)")
    pf.add_argument("workflow", metavar="WORKFLOW", help="workflow file or shipped name")
    pf.add_argument("--tp", type=int_list(gpu_count, "1,2,4"), default="1,2,4",
                    help="tensor-parallel degrees (default 1,2,4)")
    pf.add_argument("--gpu-frac", type=float_list(fraction, "0.25,0.5,1"), default="0.25,0.5,1",
                    help="GPU fractions for tp=1 (default 0.25,0.5,1)")
    pf.add_argument("--gpu", default="h100-sxm", help="GPU type of configs/gpus.yaml (default h100-sxm)")
    pf.add_argument("--backend", choices=("synthetic", "local", "slurm"), default="synthetic",
                    help="synthetic: the performance model (default); local: engine servers on this machine, over HTTP; "
                    "slurm: one array job per tp on the cluster, each task holding tp GPUs")
    pf.add_argument("--engine", choices=("sim", "vllm", "sglang"), default="sim",
                    help="engine profiled by the local and slurm backends (default sim; vllm/sglang load dummy weights)")
    pf.add_argument("--cluster", default="local", metavar="CLUSTER.yaml",
                    help="slurm backend: partition, account, QOS, walltime and GRES types (default: the shipped local)")
    pf.add_argument("--partition", help="slurm backend: override the cluster spec's partition")
    pf.add_argument("--time", type=walltime, metavar="WALLTIME", help="slurm backend: walltime per task (default: the cluster spec's)")
    pf.add_argument("--launch-prefix", metavar="CMD", help="put before each engine command (modules, apptainer exec --nv …)")
    pf.add_argument("--llms", type=name_list, help="profile only these LLMs (comma-separated)")
    pf.add_argument("--trace", metavar="FILE", help="replay the calls of this trace (default: sample the program)")
    pf.add_argument("--samples", type=count, default=DEFAULT_SAMPLES, metavar="N",
                    help="program samples without --trace (default 1000)")
    pf.add_argument("--calls", type=count, default=None, metavar="N",
                    help="calls replayed per rate (default 2000 synthetic, 1200 local: several times max_num_seqs, or an overloaded engine is one batch)")
    pf.add_argument("--time-scale", type=positive_float, default=None, metavar="S",
                    help="local engines run S wall seconds per model second (default: chosen per model)")
    pf.add_argument("--fractions", type=float_list(open_fraction, "0.15,0.5,0.9"), metavar="F,F,...",
                    help="after finding the capacity, also measure at these fractions of it (default 0.15,...,0.93)")
    pf.add_argument("--start-frac", type=open_fraction, default=0.1, metavar="F",
                    help="local backend: start the climb at F x the estimated capacity (default 0.1)")
    pf.add_argument("-o", "--output", metavar="DIR", help="profile directory (default profiles/WORKFLOW-GPU)")
    pf.add_argument("--force", action="store_true", help="re-profile configurations already in DIR")
    pf.add_argument("--log-dir", metavar="DIR", help="where local engines write their logs (default: a temp dir)")
    pf.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    pf.add_argument("--seed", type=non_negative_int, default=0)
    pf.add_argument("--json", action="store_true", help="print one JSON object")
    pf.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Profile every LLM of a workflow at each asked (tp, gpu_frac)."""

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from scepsy_hpc.perf.model import TP_DEGREES
    from scepsy_hpc.planning.inputs import load_workload
    from scepsy_hpc.profile.run import plan_jobs, run_local, run_synthetic, save
    from scepsy_hpc.profile.sweep import FRACTIONS
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.workflow import load_workflow, resolve_model

    models, gpus = load_models(args.models), load_gpus(args.gpu_catalog)
    wf = load_workflow(resolve_input(args.workflow, "workflows"), models)
    tps, fracs = list(args.tp), list(args.gpu_frac)
    bad = [t for t in tps if t not in TP_DEGREES]
    if bad:
        raise SpecError(f"--tp {','.join(map(str, tps))}: tensor-parallel degrees must be among {', '.join(map(str, TP_DEGREES))}")
    if args.gpu not in gpus:
        raise SpecError(f"--gpu {args.gpu}: unknown GPU type; known: {', '.join(gpus)}")
    llms = list(args.llms) if args.llms else list(wf.llms)
    unknown = [m for m in llms if m not in wf.llms]
    if unknown:
        raise SpecError(f"--llms: workflow {wf.name!r} has no LLM {', '.join(unknown)}; it has {', '.join(wf.llms)}")
    fractions = list(args.fractions) if args.fractions else FRACTIONS
    calls = args.calls if args.calls is not None else 2000 if args.backend == "synthetic" else 1200
    if calls < 20:
        raise SpecError(f"--calls {calls}: replay at least 20 calls per rate")
    if args.engine != "sim" and args.backend == "synthetic":
        raise SpecError(f"--engine {args.engine}: the synthetic backend has no engine; use --backend local or slurm")
    work = load_workload(wf, args.trace, args.samples, args.seed)
    out_dir = Path(args.output or f"profiles/{wf.name}-{args.gpu}").absolute()
    jobs = plan_jobs(wf, models, gpus, args.gpu, llms, tps, fracs, out_dir, args.force)
    todo = [j for j in jobs if j.skip is None]
    console = make_console(stderr=True)
    done: list[dict] = []
    failed: list[dict] = []
    if args.backend == "slurm" and todo:
        done, failed = _profile_on_slurm(args, wf, models, gpus, work, todo, out_dir, fractions, calls, console)
        todo = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=args.json or not console.is_terminal and not args.progress) as bar:
        task = bar.add_task(f"profiling {wf.name} ({args.backend})", total=len(todo))
        for job in todo:
            bar.update(task, description=f"{job.llm} tp={job.tp} f={job.gpu_frac:g}")
            model = resolve_model(wf, job.llm, models)
            mix = work.mix.get(job.llm)
            if not mix:
                raise SpecError(f"LLM {job.llm!r} has no calls in {work.source}: nothing to replay")
            if args.backend == "synthetic":
                t = run_synthetic(job, model, gpus[args.gpu], args.gpu, mix, calls, args.seed, wf.name, fractions)
            elif args.engine != "sim":
                from scepsy_hpc.backend.profiling import ProfileTask, run_task

                row = run_task(ProfileTask(job, model, gpus[args.gpu], args.gpu, tuple(mix), calls, args.seed, wf.name,
                                           engine=args.engine, fractions=tuple(fractions), start_frac=args.start_frac,
                                           out_dir=str(out_dir), log_dir=args.log_dir or str(out_dir / "logs"),
                                           launch_prefix=args.launch_prefix or ""))
                done.append(row)
                bar.advance(task)
                continue
            else:
                from scepsy_hpc.backend.profiling import sim_engine

                t = run_local(job, model, gpus[args.gpu], args.gpu, mix, calls, args.seed, wf.name,
                              args.time_scale, Path(args.log_dir) if args.log_dir else None,
                              start_frac=args.start_frac, fractions=fractions, start_engine=sim_engine)
            path = save(t, out_dir)
            done.append({"llm": t.llm, "tp": t.tp, "gpu_frac": t.gpu_frac, "capacity_rps": t.capacity_rps,
                         "points": len(t.points), "path": str(path), "source": t.source})
            bar.advance(task)
    skipped = [{"llm": j.llm, "tp": j.tp, "gpu_frac": j.gpu_frac, "why": j.skip} for j in jobs if j.skip]
    if args.json:
        print(json.dumps(jsonable({"directory": str(out_dir), "profiled": done, "skipped": skipped, "failed": failed,
                                   "workload": work.source}), indent=2))
        return 1 if failed else 0
    out = make_console()
    for d in done:
        out.print(f"{d['llm']:<12} tp={d['tp']} f={d['gpu_frac']:<5g} capacity {d['capacity_rps']:8.3f} calls/s "
                  f"({d['points']} points) -> {d['path']}")
    for s in skipped:
        out.print(f"[dim]{s['llm']:<12} tp={s['tp']} f={s['gpu_frac']:<5g} skipped: {s['why']}[/dim]")
    for f in failed:
        out.print(f"[red]{f['llm']:<12} tp={f['tp']} f={f['gpu_frac']:<5g} task {f['task']} {f['state']}: see {f['stderr']} "
                  f"and {f['stdout']}[/red]")
    out.print(f"{len(done)} profiled, {len(skipped)} skipped, {len(failed)} failed, in {out_dir} (calls from {work.source})"
              + ("; run the same command again to retry only the failed ones" if failed else ""))
    return 1 if failed else 0


def _profile_on_slurm(args: argparse.Namespace, wf, models, gpus, work, todo, out_dir: Path, fractions, calls: int, console):
    """One array per tp on the cluster spec's partition; a progress bar over tasks; (profiled, failed)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from scepsy_hpc.backend.profiling import ProfileTask, submit_arrays, watch_arrays
    from scepsy_hpc.backend.slurm import SlurmBackend
    from scepsy_hpc.spec.cluster import load_cluster
    from scepsy_hpc.spec.workflow import resolve_model
    from scepsy_hpc.topology.discover import discover

    cluster = load_cluster(resolve_input(args.cluster, "clusters"), gpus)
    slurm = cluster.slurm
    backend = SlurmBackend()
    partition = args.partition or (slurm.partition if slurm else None)
    parts = backend.partitions()
    if partition and partition not in parts:
        raise SlurmError(f"partition {partition!r} does not exist on this cluster (it has {', '.join(sorted(parts)) or 'none'}); "
                         f"fix slurm.partition in {args.cluster} or pass --partition; nothing was submitted")
    _, nodes = discover(backend.run, partition)
    widest = max((n.gpus for n in nodes if n.usable), default=0)
    too_wide = sorted({j.tp for j in todo if j.tp > widest})
    if too_wide:
        raise SlurmError(f"tp={too_wide[0]} needs {too_wide[0]} GPUs on one node; partition {partition or '(default)'} has at "
                         f"most {widest} per usable node; drop it from --tp; nothing was submitted")
    log_dir = out_dir / "logs"
    tasks = []
    for job in todo:
        mix = work.mix.get(job.llm)
        if not mix:
            raise SpecError(f"LLM {job.llm!r} has no calls in {work.source}: nothing to replay")
        tasks.append(ProfileTask(job, resolve_model(wf, job.llm, models), gpus[args.gpu], args.gpu, tuple(mix), calls,
                                 args.seed, wf.name, engine=args.engine, time_scale=args.time_scale,
                                 fractions=tuple(fractions), start_frac=args.start_frac, out_dir=str(out_dir),
                                 log_dir=str(log_dir), launch_prefix=args.launch_prefix or ""))
    gres_type = next((k for k, v in (slurm.gpu_types if slurm else {}).items() if v == args.gpu), None)
    arrays = submit_arrays(tasks, log_dir, partition=partition, account=slurm.account if slurm else None,
                           qos=slurm.qos if slurm else None, time_limit=args.time or (slurm.time if slurm else "1:00:00"),
                           gres_type=gres_type)
    console.print(f"submitted {len(arrays)} array job(s): " + ", ".join(f"{a.job_id} (tp={a.tp}, {len(a.tasks)} task(s))"
                                                                       for a in arrays) + f"; logs in {log_dir}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=args.json or not console.is_terminal and not args.progress) as bar:
        bar_task = bar.add_task(f"profiling {wf.name} on Slurm ({args.engine})", total=len(tasks))
        states = watch_arrays(arrays, backend, lambda d, _t: bar.update(bar_task, completed=d))
    done, failed = [], []
    for a in arrays:
        for t, sj in zip(a.tasks, a.jobs):
            st = states.get(sj.job_id)
            row = {"llm": t.job.llm, "tp": t.job.tp, "gpu_frac": t.job.gpu_frac, "task": sj.job_id,
                   "state": st.state if st else "UNKNOWN", "node": st.nodes if st else ""}
            if st is not None and st.state == "COMPLETED" and t.job.path.exists():
                from scepsy_hpc.profile.table import load_profile

                p = load_profile(t.job.path)
                done.append({**row, "capacity_rps": p.capacity_rps, "points": len(p.points), "path": str(t.job.path),
                             "source": p.source})
            else:
                failed.append({**row, "stdout": str(sj.paths.stdout), "stderr": str(sj.paths.stderr)})
    return done, failed
