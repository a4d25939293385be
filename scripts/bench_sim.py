#!/usr/bin/env python3
"""Simulator speed: simulated LLM calls per wall second, measured on the shipped workflows.

    python scripts/bench_sim.py                 # deep_research (the figure of record) and the others
    python scripts/bench_sim.py --workflows deep_research --requests 4000

For each workflow it simulates N requests at a rate near its hand-made plan's sustained load and
prints calls, events, wall seconds and calls per wall second (one process, one core). The best of
--repeat runs is reported, with the median beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from scepsy_hpc.sim import simulate
from scepsy_hpc.spec.catalog import config_dir, load_gpus, load_models
from scepsy_hpc.spec.plan import load_plan
from scepsy_hpc.spec.workflow import load_workflow

DEFAULT_RATES = {"deep_research": 0.8, "rag_rerank": 3.0, "beam_search": 0.3, "coding_agent": 0.5, "mixture_of_agents": 1.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflows", nargs="*", default=list(DEFAULT_RATES))
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    models, gpus = load_models(), load_gpus()
    print(f"{'workflow':18} {'rate':>5} {'requests':>8} {'calls':>8} {'events':>8} {'wall s':>7} {'calls/s best':>13} {'calls/s median':>15}")
    for name in args.workflows:
        wf = load_workflow(config_dir() / "workflows" / f"{name}.yaml", models)
        plan = load_plan(config_dir() / "plans" / f"{name}.yaml", wf, models, gpus)
        rate = DEFAULT_RATES.get(name, 1.0)
        n = args.requests if name != "beam_search" else max(args.requests // 10, 50)
        speeds, last = [], None
        for _ in range(args.repeat):
            last = simulate(wf, plan.allocation, gpus[plan.gpus.type], models, rate_rps=rate, n_requests=n, seed=args.seed)
            speeds.append(last.llm_calls / last.wall_s)
        print(f"{name:18} {rate:5g} {n:8d} {last.llm_calls:8d} {last.events:8d} {last.wall_s:7.2f} {max(speeds):13,.0f} "
              f"{statistics.median(speeds):15,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
