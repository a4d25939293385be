#!/usr/bin/env python3
"""What prefix reuse changes in a plan: `scepsy plan` on a ReAct workflow with the engines' prefix cache
modelled (the default) and without it (`--no-prefix-caching`), both plans then measured side by side in
the simulator, which models the prefix cache (as vLLM and SGLang run by default).

    python scripts/bench_prefix_plan.py                        # react_agent on 8 H100s at its 2 rps target
    python scripts/bench_prefix_plan.py --gpus 8 --rates 1 2 2.5 --requests 1000 --json

The plans come from the real command (`scepsy plan WORKFLOW --gpus N -o FILE --json`, with its
simulator check unless --no-sim-check); each is then simulated at every rate with `--requests` requests
(seeded, the same arrivals for both). Printed per rate: mean/p50/p99 request latency, throughput, the
agent's prefix-cache hit rate, and the ratio reuse-aware / reuse-blind.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scepsy_hpc.sim import simulate
from scepsy_hpc.spec.catalog import load_gpus, load_models, resolve_input
from scepsy_hpc.spec.plan import load_plan
from scepsy_hpc.spec.workflow import load_workflow


def plan(workflow: str, gpus: int, out: Path, *extra: str) -> tuple[dict[str, Any], float]:
    """`scepsy plan` as a user runs it: its JSON document and the wall seconds it took."""
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", "plan", workflow, "--gpus", str(gpus), "-o", str(out),
                           "--json", *extra], capture_output=True, text=True)
    took = time.monotonic() - t0
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        raise SystemExit(f"scepsy plan printed no JSON ({done.returncode}): {done.stderr[-2000:]}") from None
    if "error" in doc:
        raise SystemExit(f"scepsy plan {' '.join(extra)}: {doc['error']}")
    return doc, took


def shape(p: Any) -> str:
    return ", ".join(f"{llm} tp{a.tp}×{a.replicas}" + (f" f{a.gpu_frac:g}" if a.gpu_frac < 1 else "")
                     for llm, a in p.allocation.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workflow", default="react_agent", help="workflow file or shipped name (default react_agent)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--rates", type=float, nargs="*", default=None, help="rates to measure (default: 0.5×, 1× and "
                    "1.25× the workflow's target)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sim-check", action="store_true", help="plan without the simulator check (faster)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    models, gpus = load_models(), load_gpus()
    wf = load_workflow(resolve_input(args.workflow, "workflows"), models)
    target = wf.target.throughput_rps if wf.target and wf.target.throughput_rps else 1.0
    rates = args.rates or [0.5 * target, target, 1.25 * target]
    extra = ("--no-sim-check",) if args.no_sim_check else ()
    with tempfile.TemporaryDirectory() as tmp:
        docs, plans, took = {}, {}, {}
        for label, flags in (("reuse-aware", ()), ("reuse-blind", ("--no-prefix-caching",))):
            path = Path(tmp) / f"{label}.yaml"
            docs[label], took[label] = plan(args.workflow, args.gpus, path, *extra, *flags)
            plans[label] = load_plan(path, wf, models, gpus)
    rows = []
    for rate in rates:
        row: dict[str, Any] = {"rate_rps": rate}
        for label, p in plans.items():
            r = simulate(wf, p.allocation, gpus[p.gpus.type], models, rate_rps=rate, n_requests=args.requests,
                         seed=args.seed)
            hit = {llm: round(s.prefix_hit_rate, 4) for llm, s in r.per_llm.items() if s.prefix_cache_queries}
            row[label] = {"latency_mean_s": r.latency_mean_s, "latency_p50_s": r.latency_p50_s,
                          "latency_p99_s": r.latency_p99_s, "throughput_rps": r.throughput_rps, "prefix_hit_rate": hit}
        a, b = row["reuse-aware"], row["reuse-blind"]
        row["ratio"] = {k: a[k] / b[k] for k in ("latency_mean_s", "latency_p50_s", "latency_p99_s", "throughput_rps")}
        rows.append(row)
    doc = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "workflow": wf.name, "gpus": args.gpus,
           "requests": args.requests, "seed": args.seed,
           "plans": {k: {"allocation": shape(p), "plan_wall_s": round(took[k], 1),
                         "predicted": docs[k].get("predicted")} for k, p in plans.items()},
           "rows": rows}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{wf.name} on {args.gpus} GPUs, {args.requests} requests per rate, seed {args.seed}")
    for k, p in plans.items():
        print(f"  {k:12} {shape(p)}   (planned in {took[k]:.0f} s)")
    print(f"{'rate':>6} {'plan':12} {'mean s':>8} {'p50 s':>8} {'p99 s':>8} {'thr rps':>8}  hit rate")
    for row in rows:
        for k in plans:
            m = row[k]
            hits = " ".join(f"{llm} {h:.0%}" for llm, h in m["prefix_hit_rate"].items())
            print(f"{row['rate_rps']:6.2f} {k:12} {m['latency_mean_s']:8.2f} {m['latency_p50_s']:8.2f} "
                  f"{m['latency_p99_s']:8.2f} {m['throughput_rps']:8.3f}  {hits}")
        q = row["ratio"]
        print(f"{'':6} {'aware/blind':12} {q['latency_mean_s']:8.2f} {q['latency_p50_s']:8.2f} {q['latency_p99_s']:8.2f} "
              f"{q['throughput_rps']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
