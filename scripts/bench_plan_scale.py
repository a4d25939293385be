#!/usr/bin/env python3
"""Planning at scale, the whole `scepsy plan` path: 32 LLMs on 1,024 GPUs at --target-rps 30 (or --max-throughput).

Runs planning.api.plan (what `scepsy plan` runs: default options, the simulator check included) on
the synthetic workflow of scripts/bench_milp_scale.py and prints the wall time, solve_time_s, the
MILP's candidates and iterations, the time per phase (sampling, synthetic profiles, candidate
pricing, predictor calls, HiGHS, simulations; a phase's time is counted where its outermost call
runs), the predicted latency of the chosen plan and its steady-state simulated latency, and
their ratio. The steady-state run is the check's own when it ran one, else one made here
(sim.core.simulate with warm-up and length scaled to latency × rate, planning.simcheck).

    .venv/bin/python scripts/bench_plan_scale.py [--llms 32] [--gpus 1024] [--rate 30] [--repeat 1]
    .venv/bin/python scripts/bench_plan_scale.py --max-throughput     # the max-throughput goal; no steady-state
                                                                      # run of its own unless --long-run (minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_milp_scale import workflow_text  # noqa: E402

from scepsy_hpc.allocate import candidates as cand_mod  # noqa: E402
from scepsy_hpc.allocate import milp as milp_mod  # noqa: E402
from scepsy_hpc.allocate import planner as planner_mod  # noqa: E402
from scepsy_hpc.planning import api  # noqa: E402
from scepsy_hpc.planning import inputs as inputs_mod  # noqa: E402
from scepsy_hpc.planning import simcheck as simcheck_mod  # noqa: E402
from scepsy_hpc.planning.request import PlanRequest  # noqa: E402
from scepsy_hpc.sim import core as sim_core  # noqa: E402
from scepsy_hpc.spec.catalog import load_gpus, load_models  # noqa: E402
from scepsy_hpc.spec.source import parse_yaml  # noqa: E402
from scepsy_hpc.spec.workflow import parse_workflow  # noqa: E402

PHASES: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)
_active: list[str] = []


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*a: Any, **kw: Any) -> Any:
        if _active:  # counted in the outer phase
            return fn(*a, **kw)
        _active.append(name)
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            PHASES[name] += time.perf_counter() - t
            COUNTS[name] += 1
            _active.pop()
    return wrapper


def instrument() -> None:
    """Wrap the phases' entry points (module attributes, so every caller goes through them)."""
    inputs_mod.load_workload = _timed("sample programs", inputs_mod.load_workload)
    planner_mod.Planner._configs = _timed("synthetic profiles", planner_mod.Planner._configs)
    if hasattr(planner_mod.Planner, "_prefetch"):
        planner_mod.Planner._prefetch = _timed("synthetic profiles", planner_mod.Planner._prefetch)
    planner_mod.Planner._finish_demands = _timed("request graphs", planner_mod.Planner._finish_demands)
    planner_mod.Planner.latency_candidates = _timed("candidates", planner_mod.Planner.latency_candidates)
    planner_mod.Planner.evaluate = _timed("predictor (alp-cp)", planner_mod.Planner.evaluate)
    planner_mod.Planner.max_scale = _timed("HiGHS (MILP)", planner_mod.Planner.max_scale)
    planner_mod.Planner.instance_scale = _timed("HiGHS (MILP)", planner_mod.Planner.instance_scale)
    planner_mod.Planner.milp_mixed = _timed("HiGHS (MILP)", planner_mod.Planner.milp_mixed)
    planner_mod.solve = _timed("HiGHS (MILP)", planner_mod.solve)
    milp_mod.solve = _timed("HiGHS (MILP)", milp_mod.solve)
    sim_core.simulate = _timed("simulator", sim_core.simulate)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llms", type=int, default=32)
    ap.add_argument("--gpus", type=int, default=1024)
    ap.add_argument("--rate", type=float, default=30.0, help="--target-rps (default 30)")
    ap.add_argument("--repeat", type=int, default=1, help="plan this many times (timings are noisy on a shared machine)")
    ap.add_argument("--calls", type=int, default=None,
                    help="calls per synthetic profile point (default: the planner's budget, allocate.planner.profile_calls: 500 at 32 LLMs): what the profiles cost")
    ap.add_argument("--long-run", action="store_true",
                    help="also simulate the chosen plan in one long run (4×λ·L requests, the first half dropped) "
                         "to cross-check the check's steady-state reading")
    ap.add_argument("--max-throughput", action="store_true",
                    help="plan for the most throughput (`scepsy plan --max-throughput`) instead of --rate")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    if args.calls is not None:
        base = planner_mod.Planner

        class Planner(base):  # type: ignore[misc,valid-type]
            def __init__(self, *a: Any, **kw: Any) -> None:
                kw.setdefault("n_calls", args.calls)
                super().__init__(*a, **kw)

        planner_mod.Planner = Planner  # type: ignore[misc]
    models, gpus = load_models(), load_gpus()
    data, smap = parse_yaml(workflow_text(args.llms, args.rate), "synthetic_scale.yaml")
    wf = parse_workflow(data, smap, models)
    instrument()
    runs = []
    for _ in range(args.repeat):
        PHASES.clear()
        COUNTS.clear()
        req = PlanRequest(workflows=(wf,), models=models, gpus=gpus, target_rps={wf.name: args.rate},
                          gpu_count=args.gpus, goal="max-throughput" if args.max_throughput else None)
        t0 = time.perf_counter()
        res = api.plan(req)
        wall = time.perf_counter() - t0
        out = res.outcome
        phases = dict(PHASES)
        phases["other"] = wall - sum(phases.values())
        print(f"  (planned in {wall:.1f} s; phases {', '.join(f'{k} {v:.1f} s' for k, v in phases.items())})",
              file=sys.stderr, flush=True)
        steady = steady_state(res, args.long_run) if args.long_run or not args.max_throughput else None
        pred = out.latency_s
        runs.append({"wall_s": wall, "solve_time_s": out.solve_time_s, "candidates": out.candidates,
                     "iterations": out.iterations, "check_time_s": out.check_time_s, "status": out.status,
                     "phases_s": phases, "calls": dict(COUNTS), "predicted_latency_s": pred,
                     "steady_state": steady, "ratio_pred_over_sim": pred / steady["latency_mean_s"] if steady else None,
                     "notes": list(out.notes)})
        fed = None
        if out.priced is not None and hasattr(cand_mod, "prune_by_bound"):
            fed = sum(map(len, cand_mod.prune_by_bound(out.priced, res.planner.n_gpus, res.planner.fits).values()))
        runs[-1]["candidates_to_highs"] = fed
        if not args.json:
            r = runs[-1]
            goal = "most throughput" if args.max_throughput else f"{args.rate:g} rps"
            print(f"{args.llms} LLMs × {args.gpus} GPUs at {goal}: wall {wall:.1f} s, solve_time_s "
                  f"{out.solve_time_s:.2f}, {out.candidates} candidates ({fed} after the bound), {out.iterations} iterations, "
                  f"status {out.status}")
            for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
                print(f"    {k:22s} {v:7.2f} s" + (f"  ({COUNTS[k]} calls)" if k in COUNTS else ""))
            if steady is None:
                print(f"  planned {out.theta * res.planner.demands[0].weight_rps:.4g} rps; predicted latency {pred:.2f} s "
                      "(no steady-state run here: --long-run)")
            else:
                print(f"  predicted latency {pred:.2f} s; steady-state simulated {steady['latency_mean_s']:.2f} s "
                      f"({steady['source']}: {steady['requests']} requests, warm-up {steady['warmup']}); "
                      f"predicted ÷ simulated = {r['ratio_pred_over_sim']:.3f}")
            for n in out.notes:
                print(f"    note: {n}")
    if args.json:
        print(json.dumps(runs, indent=1, default=str))
    return 0


def steady_state(res: Any, long_run: bool = False) -> dict[str, Any]:
    """The chosen plan's steady-state simulated mean latency: the check's run of it, else (or with
    `long_run`) one long run here."""
    out = res.outcome
    for c in out.checked if not long_run else ():
        st = getattr(c, "steady", None)
        if c.choice == out.choice and st:
            return {"source": "the check's run", "latency_mean_s": st["latency_s"], "requests": st["requests"],
                    "warmup": f"{st['warmup_s']:.0f} s", "window": f"{st['window_s']:.0f} s", "settled": st["settled"]}
    planner = res.planner
    t = time.perf_counter()
    # one long run, the first half dropped (what the check did before it measured in steady state)
    dm = planner.demands[0]
    rate = out.theta * dm.weight_rps
    alloc = res.allocation
    lat = max(out.latency_s, 1.0)
    n = int(max(3000, 4 * lat * rate))
    r = sim_core.simulate(dm.wf, alloc, planner.gpus[planner.gpu_name], planner.models, rate_rps=rate,
                          n_requests=n, seed=res.request.seed + simcheck_mod.SEED_OFFSET, warmup_frac=0.5)
    got = {"latency_mean_s": r.latency_mean_s, "requests": n, "warmup": n // 2}
    return {"source": f"run here in {time.perf_counter() - t:.0f} s", **got}


if __name__ == "__main__":
    raise SystemExit(main())
