#!/usr/bin/env python3
"""Prefix affinity's slack, measured in the simulator: the same allocations and load under three rules.

    .venv/bin/python scripts/bench_affinity.py [--requests 3000] [--seed 0] [--json]

A call that continues a conversation goes to the replica holding its prefix while that replica is at
most `slack` calls, or `ratio` times, busier than the least loaded one (`perf.prefix.affine_ok`; the
gateway's rule and the simulator's). Rules compared, on one sample path per case:
- `slack 1`: one call, no ratio (the rule before);
- `8 / 1.5x`: the default;
- `64 / 1.5x`: the thresholds vLLM's router and SGLang's gateway default to.
Cases: allocations of 16 H100s where conversations meet load (the instance-bound allocation of
react_agent and group_chat_selector, the max-throughput MILP's allocations of supervisor_agents,
agents_handoffs and plan_execute, without the simulator check), each at rates near its capacity.
Printed per case and rule: requests/s served of the rate offered, mean and p99 latency, the prefix
cache hit rate over all LLMs (hits / prompt tokens), and the default's ratios to `slack 1`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scepsy_hpc.sim.core import simulate  # noqa: E402
from scepsy_hpc.spec.catalog import load_gpus, load_models, resolve_input  # noqa: E402
from scepsy_hpc.spec.plan import LLMAlloc  # noqa: E402
from scepsy_hpc.spec.workflow import load_workflow  # noqa: E402

RULES = {"slack 1": (1, 0.0), "8 / 1.5x": (8, 1.5), "64 / 1.5x": (64, 1.5)}


def _g(*groups: tuple[int, float, int]) -> list[LLMAlloc] | LLMAlloc:
    out = [LLMAlloc(tp=tp, gpu_frac=frac, replicas=n) for tp, frac, n in groups]
    return out[0] if len(out) == 1 else out


# (workflow, allocation on 16 H100s, rates)
CASES: list[tuple[str, dict[str, Any], tuple[float, ...]]] = [
    ("react_agent", {"agent": _g((1, 1.0, 5)), "summarizer": _g((2, 1.0, 5), (1, 1.0, 1))}, (10.0, 15.0)),
    ("supervisor_agents", {"supervisor": _g((4, 1.0, 2)),
                           "researcher": _g((1, 1.0, 1), (1, 0.75, 1), (1, 0.5, 1), (1, 0.25, 1)),
                           "coder": _g((4, 1.0, 1), (1, 1.0, 1)), "mathstral": _g((1, 0.5, 1))}, (5.0,)),
    ("agents_handoffs", {"triage": _g((1, 0.5, 1)), "billing": _g((1, 1.0, 2), (1, 0.5, 1)),
                         "support": _g((4, 1.0, 2), (2, 1.0, 1)), "refunds": _g((1, 1.0, 3))}, (75.0,)),
    ("plan_execute", {"planner": _g((4, 1.0, 2)), "executor": _g((4, 1.0, 2))}, (2.0,)),
    ("group_chat_selector", {"selector": _g((1, 0.25, 3)), "planner": _g((8, 1.0, 1)), "critic": _g((2, 1.0, 1)),
                             "writer": _g((4, 1.0, 1)), "checker": _g((1, 1.0, 1), (1, 0.25, 1))}, (1.3,)),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000, help="requests per run (default 3000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)
    models, gpus = load_models(None), load_gpus(None)
    rows = []
    t0 = time.perf_counter()
    for name, alloc, rates in CASES:
        wf = load_workflow(resolve_input(name, "workflows"), models)
        for rate in rates:
            row: dict[str, Any] = {"workflow": name, "rate_rps": rate, "rules": {}}
            for rule, (slack, ratio) in RULES.items():
                r = simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=rate, n_requests=args.requests, seed=args.seed,
                             affinity_slack=slack, affinity_ratio=ratio)
                q = sum(s.prefix_cache_queries for s in r.per_llm.values())
                h = sum(s.prefix_cache_hits for s in r.per_llm.values())
                row["rules"][rule] = {"served_rps": r.throughput_rps, "latency_mean_s": r.latency_mean_s,
                                      "latency_p99_s": r.latency_p99_s, "hit_rate": h / q if q else 0.0}
            rows.append(row)
            if not args.json:
                print(f"{name} at {rate:g} rps ({args.requests} requests):", flush=True)
                for rule, m in row["rules"].items():
                    print(f"  {rule:10s} served {m['served_rps']:7.2f} rps  mean {m['latency_mean_s']:7.1f} s  "
                          f"p99 {m['latency_p99_s']:7.1f} s  prefix hits {m['hit_rate']:.1%}", flush=True)
                a, b = row["rules"]["8 / 1.5x"], row["rules"]["slack 1"]
                print(f"  default ÷ slack 1: served {a['served_rps'] / b['served_rps']:.2f}x, "
                      f"mean latency {a['latency_mean_s'] / b['latency_mean_s']:.2f}x", flush=True)
    if args.json:
        print(json.dumps({"requests": args.requests, "seed": args.seed, "wall_s": time.perf_counter() - t0, "cases": rows}))
    else:
        print(f"wall {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
