#!/usr/bin/env python3
"""The gateway's request cap (gateway/admission.py; `predicted.max_requests` of a plan): each workflow's
max-throughput plan simulated with and without it, side by side in one run, at its planned rate and past its
capacity.

    .venv/bin/python scripts/bench_request_cap.py [--workflows plan_execute,supervisor_agents] [--gpus 8] \\
        [--requests 1500] [--over 1.3]

Per workflow: the plan (`scepsy plan W --gpus G --max-throughput --no-sim-check`) and its cap (None for a
workflow whose calls continue no conversation: the plan writes none), then `simulate` (seed 0, the same
requests each way) at the planned rate and at `--over` × the predicted capacity, uncapped and capped: the
requests/s served and the mean latency, and capped ÷ uncapped. A workflow the plan writes no cap for is
simulated with the cap it would have (the requests in flight at the same point), to show what it would cost.
"""

from __future__ import annotations

import argparse
import math
import sys

from scepsy_hpc.allocate.allocation import as_allocation
from scepsy_hpc.planning import plan
from scepsy_hpc.planning.render import request_caps
from scepsy_hpc.planning.request import PlanRequest
from scepsy_hpc.sim import simulate
from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.catalog import config_dir, load_gpus, load_models, shipped_names
from scepsy_hpc.spec.workflow import continues_conversations, load_workflow

DEFAULT = "plan_execute,supervisor_agents,group_chat_selector,crew_hierarchical,reflexion,react_agent,rag_rerank"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workflows", default=DEFAULT, help=f"shipped workflows (default {DEFAULT})")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--over", type=float, default=1.3, help="the rate past capacity, × the predicted capacity")
    args = ap.parse_args()
    if not 1 <= args.gpus <= 4096 or not 50 <= args.requests <= 100_000 or not 1.0 < args.over <= 10:
        ap.error(f"--gpus {args.gpus} / --requests {args.requests} / --over {args.over}: GPUs 1..4096, "
                 "requests 50..100,000, over in (1, 10]")
    models, gpus = load_models(), load_gpus()
    try:
        names = shipped_names("workflows", args.workflows)
    except SpecError as exc:
        ap.error(f"--workflows: {exc}")
    gpu = gpus["h100-sxm"]
    print(f"{'workflow':20} {'conv.':>5} {'cap':>5} {'rate':>7}  {'served uncapped / capped':>25}  "
          f"{'ratio':>5}  {'latency s uncapped / capped':>28}  {'ratio':>5}")
    for name in names:
        wf = load_workflow(config_dir() / "workflows" / f"{name}.yaml", models)
        req = PlanRequest(workflows=(wf,), models=models, gpus=gpus, goal="max-throughput", target_rps={wf.name: 1.0},
                          gpu_type="h100-sxm", gpu_count=args.gpus, sim_check=False)
        result = plan(req)
        out = result.outcome
        pred = out.predictions[wf.name]
        cap = request_caps(result).get(wf.name)
        conv = continues_conversations(wf)
        if cap is None:   # what it would be (the same point of the same plan)
            theta = result.planner.throughput_scale(out.predictions) * result.planner.max_util * (1 - req.throughput_tol)
            at = result.planner.evaluate(out.choice, theta)[wf.name]
            cap = max(1, math.ceil(theta * wf_weight(result) * at.latency_s))
        alloc = as_allocation(out.choice)
        for rate in (out.rates[wf.name], args.over * pred.throughput_rps):
            free, held = (simulate(wf, alloc, gpu, models, rate_rps=rate, n_requests=args.requests, seed=0,
                                   max_requests=m) for m in (None, cap))
            print(f"{name:20} {'yes' if conv else 'no':>5} {cap:5d} {rate:7.3g}  {free.throughput_rps:12.3g} / "
                  f"{held.throughput_rps:10.3g}  {held.throughput_rps / free.throughput_rps:5.2f}  "
                  f"{free.latency_mean_s:14.1f} / {held.latency_mean_s:11.1f}  "
                  f"{held.latency_mean_s / free.latency_mean_s:5.2f}", flush=True)
    return 0


def wf_weight(result: object) -> float:
    """The one workflow's requests/s per unit of rate scale."""
    return result.planner.demands[0].weight_rps   # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
