#!/usr/bin/env python3
"""Share stability: per LLM, the coefficient of variation of its share of a request's LLM time,
against the CV of end-to-end latency — the regularity Scepsy builds on.

Each shipped workflow runs under its shipped plan in the simulator at 60% of its predicted
capacity; the simulated calls become a trace (the gateway's record format) and are aggregated as
`scepsy stats` does. Trace files given with --trace are reported too (e.g. from `scepsy trace`).

    .venv/bin/python scripts/share_stability.py [--requests 1500] [--trace FILE ...]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scepsy_hpc.predict.alp import predict_cp  # noqa: E402
from scepsy_hpc.predict.inputs import ProfileSource, program_graphs, sample_mix, sample_program  # noqa: E402
from scepsy_hpc.sim.core import simulate  # noqa: E402
from scepsy_hpc.spec.catalog import config_dir, load_gpus, load_models  # noqa: E402
from scepsy_hpc.spec.plan import load_plan  # noqa: E402
from scepsy_hpc.spec.workflow import load_workflow  # noqa: E402
from scepsy_hpc.trace.convert import trace_from_sim  # noqa: E402
from scepsy_hpc.trace.graph import from_trace  # noqa: E402
from scepsy_hpc.trace.records import read_trace  # noqa: E402
from scepsy_hpc.trace.stats import aggregate  # noqa: E402

WORKFLOWS = ("rag_rerank", "beam_search", "coding_agent", "deep_research", "mixture_of_agents")


def report(label: str, stats) -> None:
    """Print one workflow's shares and CVs."""
    print(f"\n{label}: {stats.requests} requests, latency mean {stats.latency_mean_s:.1f} s, CV {stats.latency_cv:.2f}")
    print(f"  {'LLM':<12} {'share':>7} {'share CV':>9} {'CV ratio (latency/share)':>26}")
    for m, s in stats.per_llm.items():
        ratio = stats.latency_cv / s.share_cv if s.share_cv and not math.isnan(s.share_cv) else math.inf
        print(f"  {m:<12} {s.share_mean:7.1%} {s.share_cv:9.2f} {ratio:26.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--load", type=float, default=0.6, help="fraction of the predicted capacity (default 0.6)")
    ap.add_argument("--trace", nargs="*", default=[], help="also report these trace files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    models, gpus = load_models(), load_gpus()
    for name in WORKFLOWS:
        wf = load_workflow(config_dir() / "workflows" / f"{name}.yaml", models)
        plan = load_plan(config_dir() / "plans" / f"{name}.yaml", wf, models, gpus)
        seqs = sample_program(wf, 500, seed=args.seed)
        profiles = ProfileSource(wf, models, gpus, sample_mix(seqs), seqs=seqs).for_allocation(plan.allocation, plan.gpus.type)
        cap = predict_cp(program_graphs(seqs, profiles), profiles, {m: a.replicas for m, a in plan.allocation.items()},
                         1e-3).throughput_rps
        rate = args.load * cap
        res = simulate(wf, plan.allocation, gpus[plan.gpus.type], models, rate_rps=rate, n_requests=args.requests,
                       seed=args.seed, record_calls=True)
        graphs = from_trace(trace_from_sim(res))
        skip = int(len(graphs) * res.warmup_frac)
        report(f"{name} (simulated, {rate:.2f} rps = {args.load:.0%} of predicted capacity, shipped plan)",
               aggregate(graphs[skip:], name))
    for path in args.trace:
        tr = read_trace(path)
        report(f"{path} (traced through the gateway)", aggregate(from_trace(tr), str(tr.meta.get("workflow", ""))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
