#!/usr/bin/env python3
"""The capacity judge against long single runs: per plan, the judge's maximum beside the truth.

The cases are max-throughput plans that `scepsy bench` chose at 32 H100s (issue 4's table), where
milp's plans carry a steady backlog of ~1,000 requests in flight and take ~7,000 requests to fill.
For each case:
- the judge: `sim.capacity.max_sustainable_rate` from the bench's starting guess with the bench's
  request count (1,200), its maximum, the runs it made, the requests they simulated and its wall time;
- the truth: the same bisection, but every verdict from ONE long run (`--long` × the requests, 20×
  by default) whose in-flight count is read over its second half only — long past any fill — with
  the judge's tolerance (≤ 2% of the arrivals piling up). Its bracket [holds, piles up] is printed
  with the in-flight count per tenth of the run at each end, so a reader sees the backlog flat on
  one side and climbing on the other.
A case agrees when the judged maximum lies in the truth's bracket widened by `--tol` (5%).

    PYTHONPATH=$PWD .venv/bin/python scripts/validate_capacity.py [--cases deep_research/milp,...] [--long 20] [--json]
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scepsy_hpc.sim.capacity import PILEUP, backlog_growth, bisect_rate, max_sustainable_rate  # noqa: E402
from scepsy_hpc.sim.core import SimResult, simulate  # noqa: E402
from scepsy_hpc.spec.catalog import config_dir, load_gpus, load_models  # noqa: E402
from scepsy_hpc.spec.plan import LLMAlloc  # noqa: E402
from scepsy_hpc.spec.workflow import load_workflow  # noqa: E402

# workflow/policy → (allocation as the bench printed it, at 32 H100s unless said, the bench's reading in rps)
CASES = {
    "deep_research/milp": ("planner:1xtp4 searcher:6xtp2 writer:4xtp4", 3.57),
    "deep_research/independent": ("planner:1xtp4 searcher:5xtp1 writer:2xtp8", 2.15),
    "coding_agent/milp": ("architect:3xtp4 coder:4xtp4 reviewer:1xtp4", 3.01),
    "mixture_of_agents/milp": ("qwen72:2xtp8 llama70:2xtp4 mixtral:1xtp4 qwen32:1xtp4", 3.43),
    "beam_search/milp": ("generator:18xtp1 prm:14xtp1", 2.9),
    "beam_search/equal": ("generator:16xtp1 prm:16xtp1", 2.53),
    # issue 23's table (bench_table.py, 600 requests a run): reflexion at 16 GPUs, agents_handoffs at 32
    "reflexion/milp": ("actor:3xtp4 reflector:2xtp2", 8.88),
    "agents_handoffs/milp": ("triage:1xtp1 billing:5xtp1 support:5xtp4 refunds:3xtp2", 120.09),
}


def parse_allocation(text: str) -> dict[str, LLMAlloc]:
    """`name:RxtpT` / `name:RxF` per LLM (the bench's short form) → allocation."""
    out = {}
    for part in text.split():
        name, spec = part.split(":")
        reps, cfg = spec.split("x", 1)
        if cfg.startswith("tp"):
            out[name] = LLMAlloc(tp=int(cfg[2:]), gpu_frac=1.0, replicas=int(reps))
        else:
            out[name] = LLMAlloc(tp=1, gpu_frac=float(cfg), replicas=int(reps))
    return out


def in_flight_tenths(res: SimResult) -> list[int]:
    """Mean requests in flight (sampled at each arrival) per tenth of the arrivals."""
    recs = res.request_records
    ends = sorted(r.t_end for r in recs if r.t_end >= 0)
    ws = [i + 1 - bisect.bisect_right(ends, r.t_arrive) for i, r in enumerate(recs)]
    k = max(len(ws) // 10, 1)
    return [round(sum(ws[i * k:(i + 1) * k]) / k) for i in range(10)]


def truth(wf, alloc, gpu, models, guess: float, n_long: int, seed: int, rel_tol: float) -> dict:
    """Bisect on one long run per rate, read over its second half (see module docstring)."""
    seen: dict[float, tuple[bool, float, list[int], float]] = {}

    def ok(rate: float) -> bool:
        res = simulate(wf, alloc, gpu, models, rate_rps=rate, n_requests=n_long, seed=seed)
        growth = backlog_growth(res, 0.5)
        good = res.completed == res.requests and growth <= PILEUP
        seen[rate] = (good, growth, in_flight_tenths(res), res.throughput_rps)
        return good

    t0 = time.perf_counter()
    lo, hi = bisect_rate(ok, guess, rel_tol=rel_tol, max_runs=12, step=1.15)
    return {"holds_rps": lo, "piles_rps": hi, "wall_s": time.perf_counter() - t0,
            "runs": [{"rate_rps": r, "holds": v[0], "growth_2nd_half": v[1], "in_flight_tenths": v[2],
                      "throughput_rps": v[3]} for r, v in sorted(seen.items())]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="workflow/policy,... (default: all)")
    ap.add_argument("--requests", type=int, default=1200, help="the judge's requests per run (bench default 1200)")
    ap.add_argument("--long", type=int, default=20, help="truth runs are this many × --requests (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=0.05, help="agreement: judged max within the truth bracket ± tol")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    models, gpus = load_models(None), load_gpus(None)
    gpu = gpus["h100-sxm"]
    rows = []
    for case in args.cases.split(","):
        if case not in CASES:
            sys.exit(f"--cases {case}: unknown; known: {', '.join(CASES)}")
        name = case.split("/")[0]
        text, bench_rps = CASES[case]
        wf = load_workflow(config_dir() / "workflows" / f"{name}.yaml", models)
        alloc = parse_allocation(text)
        t0 = time.perf_counter()
        judged = max_sustainable_rate(wf, alloc, gpu, models, bench_rps, n_requests=args.requests, seed=args.seed)
        judge_wall = time.perf_counter() - t0
        tr = truth(wf, alloc, gpu, models, judged.sustainable_rps or bench_rps, args.long * args.requests, args.seed,
                   rel_tol=0.02)
        lo, hi = tr["holds_rps"], tr["piles_rps"]
        agree = lo * (1 - args.tol) <= judged.sustainable_rps <= hi * (1 + args.tol)
        rows.append({"case": case, "allocation": text, "bench_read_rps": bench_rps,
                     "judge_max_rps": judged.sustainable_rps, "judge_refused_rps": judged.unsustainable_rps,
                     "judge_runs": len(judged.runs), "judge_requests": sum(judged.requests),
                     "judge_longest_run": max(judged.requests, default=0), "judge_wall_s": judge_wall,
                     "truth_holds_rps": lo, "truth_piles_rps": hi, "truth_wall_s": tr["wall_s"],
                     "agree": agree, "truth_runs": tr["runs"]})
        if not args.json:
            r = rows[-1]
            print(f"{case:28s} judge {r['judge_max_rps']:.3g} (refused {r['judge_refused_rps']:.3g}; {r['judge_runs']} runs, "
                  f"{r['judge_requests']} requests, longest {r['judge_longest_run']}, {judge_wall:.0f} s) | truth holds "
                  f"{lo:.3g}, piles up {hi:.3g} ({args.long * args.requests} requests per run, {tr['wall_s']:.0f} s) | "
                  f"{'agree' if agree else 'DISAGREE'}", flush=True)
            for run in tr["runs"]:
                if run["rate_rps"] in (lo, hi):
                    print(f"    truth at {run['rate_rps']:.3g} rps: {'holds' if run['holds'] else 'piles up'}, growth over "
                          f"the 2nd half {run['growth_2nd_half']:+.3f}, in flight per tenth {run['in_flight_tenths']}",
                          flush=True)
    if args.json:
        print(json.dumps({"requests": args.requests, "long": args.long, "seed": args.seed, "cases": rows}, indent=2))
    else:
        n_ok = sum(r["agree"] for r in rows)
        print(f"{n_ok}/{len(rows)} cases agree (judged max within the truth bracket ± {args.tol:.0%}); judge wall "
              f"{sum(r['judge_wall_s'] for r in rows):.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
