"""`scepsy profile`: profile a workflow's LLMs over a (tp, gpu_frac) grid, one file per configuration."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scepsy_hpc.commands.common import jsonable, load_workload, make_console, resolve_input
from scepsy_hpc.errors import SpecError


def _numbers(text: str, kind: type, flag: str) -> list:
    try:
        vals = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"{flag} {text!r}: give a comma-separated list of numbers, e.g. {flag} 1,2,4") from None
    if not vals:
        raise SpecError(f"{flag}: give at least one value")
    return vals


def cmd_profile(args: argparse.Namespace) -> int:
    """Profile every LLM of a workflow at each asked (tp, gpu_frac)."""

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from scepsy_hpc.perf.model import TP_DEGREES
    from scepsy_hpc.profile.run import plan_jobs, run_local, run_synthetic, save
    from scepsy_hpc.profile.sweep import FRACTIONS
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.workflow import load_workflow, resolve_model

    models, gpus = load_models(args.models), load_gpus(args.gpu_catalog)
    wf = load_workflow(resolve_input(args.workflow, "workflows"), models)
    tps = _numbers(args.tp, int, "--tp")
    bad = [t for t in tps if t not in TP_DEGREES]
    if bad:
        raise SpecError(f"--tp {args.tp}: tensor-parallel degrees must be among {', '.join(map(str, TP_DEGREES))}")
    fracs = _numbers(args.gpu_frac, float, "--gpu-frac")
    if any(not 0 < f <= 1 for f in fracs):
        raise SpecError(f"--gpu-frac {args.gpu_frac}: fractions must lie in (0, 1]")
    if args.gpu not in gpus:
        raise SpecError(f"--gpu {args.gpu}: unknown GPU type; known: {', '.join(gpus)}")
    llms = args.llms.split(",") if args.llms else list(wf.llms)
    unknown = [m for m in llms if m not in wf.llms]
    if unknown:
        raise SpecError(f"--llms: workflow {wf.name!r} has no LLM {', '.join(unknown)}; it has {', '.join(wf.llms)}")
    fractions = _numbers(args.fractions, float, "--fractions") if args.fractions else FRACTIONS
    if any(not 0 < f < 1 for f in fractions):
        raise SpecError(f"--fractions {args.fractions}: fractions of the capacity lie in (0, 1)")
    if not 0 < args.start_frac < 1:
        raise SpecError(f"--start-frac {args.start_frac:g}: give a fraction of the estimated capacity in (0, 1)")
    if args.calls is None:
        args.calls = 2000 if args.backend == "synthetic" else 1200
    if args.calls < 20:
        raise SpecError(f"--calls {args.calls}: replay at least 20 calls per rate")
    work = load_workload(wf, args.trace, args.samples, args.seed)
    out_dir = Path(args.output or f"profiles/{wf.name}-{args.gpu}")
    jobs = plan_jobs(wf, models, gpus, args.gpu, llms, tps, fracs, out_dir, args.force)
    todo = [j for j in jobs if j.skip is None]
    console = make_console(stderr=True)
    done: list[dict] = []
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
                t = run_synthetic(job, model, gpus[args.gpu], args.gpu, mix, args.calls, args.seed, wf.name, fractions)
            else:
                t = run_local(job, model, gpus[args.gpu], args.gpu, mix, args.calls, args.seed, wf.name,
                              args.time_scale, Path(args.log_dir) if args.log_dir else None,
                              start_frac=args.start_frac, fractions=fractions)
            path = save(t, out_dir)
            done.append({"llm": t.llm, "tp": t.tp, "gpu_frac": t.gpu_frac, "capacity_rps": t.capacity_rps,
                         "points": len(t.points), "path": str(path), "source": t.source})
            bar.advance(task)
    skipped = [{"llm": j.llm, "tp": j.tp, "gpu_frac": j.gpu_frac, "why": j.skip} for j in jobs if j.skip]
    if args.json:
        print(json.dumps(jsonable({"directory": str(out_dir), "profiled": done, "skipped": skipped,
                                   "workload": work.source}), indent=2))
        return 0
    out = make_console()
    for d in done:
        out.print(f"{d['llm']:<12} tp={d['tp']} f={d['gpu_frac']:<5g} capacity {d['capacity_rps']:8.3f} calls/s "
                  f"({d['points']} points) -> {d['path']}")
    for s in skipped:
        out.print(f"[dim]{s['llm']:<12} tp={s['tp']} f={s['gpu_frac']:<5g} skipped: {s['why']}[/dim]")
    out.print(f"{len(done)} profiled, {len(skipped)} skipped, in {out_dir} (calls from {work.source})")
    return 0
