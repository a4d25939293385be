#!/usr/bin/env python3
"""The capacity judge's cost: each lengthened run simulated afresh against continued (`sim.core.GrowingRun`:
the longest run once plus each shorter run's drain, in a forked copy), side by side in one process, on
the shipped workflows' max-throughput plans. Both must find the same rates with the same verdicts.

    .venv/bin/python scripts/bench_capacity_judge.py [--workflows plan_execute,react_agent] [--gpus 8] [--requests 600]

Per workflow: the plan (`scepsy plan W --gpus G --max-throughput --no-sim-check`), then
`max_sustainable_rate` from its predicted capacity both ways: the bisection's runs, the longest run
(requests), the wall seconds of each way and their ratio, and whether the results are identical.
"""

from __future__ import annotations

import argparse
import sys
import time

from scepsy_hpc.allocate.allocation import as_allocation
from scepsy_hpc.planning import plan
from scepsy_hpc.planning.request import PlanRequest
from scepsy_hpc.sim.capacity import max_sustainable_rate
from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.catalog import config_dir, load_gpus, load_models, shipped_names
from scepsy_hpc.spec.workflow import load_workflow


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workflows", default="plan_execute,react_agent,rag_rerank",
                    help="shipped workflows (default plan_execute,react_agent,rag_rerank; tot_verifier or beam_search: an hour or more)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--requests", type=int, default=600)
    args = ap.parse_args()
    if not 1 <= args.gpus <= 4096 or not 10 <= args.requests <= 100_000:
        ap.error(f"--gpus {args.gpus} / --requests {args.requests}: GPUs 1..4096, requests 10..100,000")
    models, gpus = load_models(), load_gpus()
    try:
        names = shipped_names("workflows", args.workflows)
    except SpecError as exc:
        ap.error(f"--workflows: {exc}")
    print(f"{'workflow':20} {'runs':>4} {'longest':>7} {'max rps':>8} {'afresh s':>9} {'grown s':>8} {'ratio':>6}  same")
    tot_a = tot_g = 0.0
    for name in names:
        wf = load_workflow(config_dir() / "workflows" / f"{name}.yaml", models)
        req = PlanRequest(workflows=(wf,), models=models, gpus=gpus, goal="max-throughput", target_rps={wf.name: 1.0},
                          gpu_type="h100-sxm", gpu_count=args.gpus, sim_check=False)
        out = plan(req).outcome
        alloc = as_allocation(out.choice)
        guess = next(iter(out.predictions.values())).throughput_rps
        gpu = gpus["h100-sxm"]
        t0 = time.perf_counter()
        a = max_sustainable_rate(wf, alloc, gpu, models, guess, n_requests=args.requests, grow=False)
        t1 = time.perf_counter()
        g = max_sustainable_rate(wf, alloc, gpu, models, guess, n_requests=args.requests, grow=True)
        t2 = time.perf_counter()
        same = (a.sustainable_rps, a.unsustainable_rps, a.runs, a.requests) == (g.sustainable_rps, g.unsustainable_rps,
                                                                                g.runs, g.requests)
        tot_a += t1 - t0
        tot_g += t2 - t1
        print(f"{name:20} {len(a.runs):4d} {max(a.requests):7d} {a.sustainable_rps:8.3g} {t1 - t0:9.1f} {t2 - t1:8.1f} "
              f"{(t2 - t1) / (t1 - t0):6.2f}  {'yes' if same else 'NO'}", flush=True)
        if not same:
            print(f"  afresh {a.runs}\n  grown  {g.runs}", file=sys.stderr)
            return 1
    print(f"{'all':20} {'':4} {'':7} {'':8} {tot_a:9.1f} {tot_g:8.1f} {tot_g / tot_a:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
