#!/usr/bin/env python3
"""Does the predictor rank allocations as the simulator does? One workflow, GPU count and rate.

Enumerates every allocation the MILP chooses from at that rate (the capacity-feasible candidates
of each deployment, all combinations that fit the GPUs; workflows with few LLMs only), ranks them
by predicted (alp-cp) mean latency and simulates the best `--top` of them plus each baseline
policy's plan at the same rate and seed. Prints predicted against simulated latency, and per LLM
the admission wait against the whole call latency: a call that waits after admission (inside the
engine, behind other prefills) points at bursts the Poisson-fed profiles never see. Ends with the
Spearman rank correlation of predicted and simulated latency over the simulated allocations.

    .venv/bin/python scripts/rank_check.py beam_search --gpus 16 --rate 0.79 [--top 15] [--requests 1200]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scepsy_hpc.allocate import policies  # noqa: E402
from scepsy_hpc.allocate.planner import Demand, Planner, used_gpus  # noqa: E402
from scepsy_hpc.commands.bench import short_allocation  # noqa: E402
from scepsy_hpc.commands.common import resolve_input  # noqa: E402
from scepsy_hpc.predict.inputs import sample_mix, sample_program  # noqa: E402
from scepsy_hpc.sim.core import simulate  # noqa: E402
from scepsy_hpc.spec.catalog import load_gpus, load_models  # noqa: E402
from scepsy_hpc.spec.plan import LLMAlloc  # noqa: E402
from scepsy_hpc.spec.workflow import load_workflow  # noqa: E402


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    for k, i in enumerate(order):
        r[i] = float(k)
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no tie correction: latencies are continuous)."""
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va > 0 and vb > 0 else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workflow")
    ap.add_argument("--gpus", type=int, default=16)
    ap.add_argument("--gpu-type", default="h100-sxm")
    ap.add_argument("--rate", type=float, required=True, help="requests/s")
    ap.add_argument("--top", type=int, default=15, help="simulate this many of the best-predicted allocations")
    ap.add_argument("--requests", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-combos", type=int, default=20000, help="refuse to enumerate more allocations than this")
    args = ap.parse_args()
    models, gpus = load_models(), load_gpus()
    wf = load_workflow(resolve_input(args.workflow, "workflows"), models)
    seqs = sample_program(wf, 1000, args.seed)
    pl = Planner([Demand(wf, 1.0, sample_mix(seqs), seqs)], models, gpus, args.gpu_type, args.gpus)
    cands = pl.latency_candidates(args.rate, {0: None})
    total = 1
    for cs in cands.values():
        total *= len(cs)
    if total > args.max_combos:
        print(f"{total} combinations of candidates: too many to enumerate (raise --max-combos)", file=sys.stderr)
        return 2
    scored = []
    for combo in itertools.product(*cands.values()):
        choice = dict(zip(cands, combo))
        if used_gpus(choice) <= args.gpus:
            pred = next(iter(pl.evaluate(choice, args.rate).values()))
            scored.append((pred.latency_s, "", choice))
    scored.sort(key=lambda t: t[0])
    rows = scored[:args.top]
    for pol in policies.POLICIES:
        o = policies.plan_at(pl, pol, args.rate)
        rows.append((next(iter(o.predictions.values())).latency_s, pol, dict(o.choice)))
    print(f"{wf.name} on {args.gpus} {args.gpu_type} at {args.rate:g} rps: {len(scored)} allocations fit; "
          f"simulating the best {len(rows) - len(policies.POLICIES)} predicted and the policies' plans "
          f"({args.requests} requests, seed {args.seed})")
    pred_l, sim_l = [], []
    for lat, pol, choice in rows:
        alloc = {m: LLMAlloc(tp=c.tp, gpu_frac=c.gpu_frac, replicas=c.replicas) for m, c in choice.items()}
        res = simulate(wf, alloc, gpus[args.gpu_type], models, rate_rps=args.rate, n_requests=args.requests, seed=args.seed)
        pred_l.append(lat)
        sim_l.append(res.latency_mean_s)
        waits = " ".join(f"{m} {s.queue_mean_s:.2f}/{s.latency_mean_s:.2f}s" for m, s in res.per_llm.items())
        print(f"{pol or '-':<11} pred {lat:7.1f} s  sim {res.latency_mean_s:7.1f} s  ({used_gpus(choice):>3} GPUs) "
              f"{short_allocation(choice)}  [admission wait/call: {waits}]", flush=True)
    print(f"Spearman rank correlation, predicted vs simulated latency: {spearman(pred_l, sim_l):+.2f} (n={len(rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
