#!/usr/bin/env python3
"""Predictor accuracy against the simulator: every shipped workflow × 3 allocations × 3 rates.

For each allocation: predicted capacity (min_m r_m·μ_m/n_m, the same for both predictors) against
the simulator's maximum sustainable rate (bisection, scepsy_hpc.sim.capacity), and at about 30%,
60% and 85% of the predicted capacity the predicted mean latency of `alp-cp` and `alp-paper`
against the simulated mean latency. Statistics come from the workflow's program (sampled, unloaded)
and profiles are synthetic (performance model), exactly as `scepsy predict` does without
--trace/--profiles. Prints a table per workflow and a summary (median and worst absolute error).

    .venv/bin/python scripts/bench_predict.py [--workflows a,b] [--requests 2000] [--cap-requests 4000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scepsy_hpc.predict.alp import predict_cp, predict_paper  # noqa: E402
from scepsy_hpc.predict.inputs import ProfileSource, program_graphs, sample_mix, sample_program  # noqa: E402
from scepsy_hpc.sim.capacity import max_sustainable_rate  # noqa: E402
from scepsy_hpc.sim.core import simulate  # noqa: E402
from scepsy_hpc.spec.catalog import config_dir, load_gpus, load_models  # noqa: E402
from scepsy_hpc.spec.plan import LLMAlloc, load_plan  # noqa: E402
from scepsy_hpc.spec.workflow import load_workflow  # noqa: E402

A = LLMAlloc
# Besides each shipped plan (16 H100s), two other allocations per workflow: one leaning to
# tensor parallelism, one to replicas or GPU fractions, so the predictors see different curves.
VARIANTS = {
    "rag_rerank": {
        "tp-heavy": {"rewriter": A(tp=1, gpu_frac=1.0, replicas=1), "reranker": A(tp=1, gpu_frac=1.0, replicas=1),
                     "generator": A(tp=8, gpu_frac=1.0, replicas=1)},
        "fractions": {"rewriter": A(tp=1, gpu_frac=0.25, replicas=2), "reranker": A(tp=1, gpu_frac=0.25, replicas=2),
                      "generator": A(tp=2, gpu_frac=1.0, replicas=4)},
    },
    "beam_search": {
        "fewer": {"generator": A(tp=1, gpu_frac=1.0, replicas=6), "prm": A(tp=1, gpu_frac=1.0, replicas=4)},
        "tp2": {"generator": A(tp=2, gpu_frac=1.0, replicas=4), "prm": A(tp=1, gpu_frac=1.0, replicas=8)},
    },
    "coding_agent": {
        "tp8": {"architect": A(tp=8, gpu_frac=1.0, replicas=1), "coder": A(tp=4, gpu_frac=1.0, replicas=1),
                "reviewer": A(tp=1, gpu_frac=1.0, replicas=4)},
        "small": {"architect": A(tp=4, gpu_frac=1.0, replicas=1), "coder": A(tp=2, gpu_frac=1.0, replicas=2),
                  "reviewer": A(tp=1, gpu_frac=0.5, replicas=2)},
    },
    "deep_research": {
        "tp2": {"planner": A(tp=2, gpu_frac=1.0, replicas=1), "searcher": A(tp=1, gpu_frac=1.0, replicas=6),
                "writer": A(tp=2, gpu_frac=1.0, replicas=2)},
        "tp8": {"planner": A(tp=8, gpu_frac=1.0, replicas=1), "searcher": A(tp=1, gpu_frac=0.5, replicas=6),
                "writer": A(tp=4, gpu_frac=1.0, replicas=1)},
    },
    "mixture_of_agents": {
        "tp8": {"qwen72": A(tp=8, gpu_frac=1.0, replicas=1), "llama70": A(tp=4, gpu_frac=1.0, replicas=1),
                "mixtral": A(tp=2, gpu_frac=1.0, replicas=1), "qwen32": A(tp=2, gpu_frac=1.0, replicas=1)},
        "lean": {"qwen72": A(tp=4, gpu_frac=1.0, replicas=1), "llama70": A(tp=2, gpu_frac=1.0, replicas=1),
                 "mixtral": A(tp=2, gpu_frac=1.0, replicas=1), "qwen32": A(tp=1, gpu_frac=1.0, replicas=1)},
    },
}
FRACTIONS = (0.3, 0.6, 0.85)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workflows", default=",".join(VARIANTS))
    ap.add_argument("--requests", type=int, default=2000, help="simulated requests per latency run")
    ap.add_argument("--cap-requests", type=int, default=8000, help="simulated requests per capacity-search run "
                    "(fewer for workflows with many calls per request: at most --cap-calls calls)")
    ap.add_argument("--cap-calls", type=int, default=600_000, help="simulated LLM calls per capacity-search run at most")
    ap.add_argument("--sample", type=int, default=1000, help="program samples for the predictors")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--arrivals", choices=("poisson", "requests"), default="poisson",
                    help="synthetic profiles of Poisson single calls on one replica (default, as `scepsy predict` "
                         "and as a measured profile), or fed whole requests' call patterns on the allocated replicas")
    ap.add_argument("--json", help="write all rows to this file")
    args = ap.parse_args()
    models, gpus = load_models(), load_gpus()
    rows, caps = [], []
    t_all = time.perf_counter()
    for name in args.workflows.split(","):
        wf = load_workflow(config_dir() / "workflows" / f"{name}.yaml", models)
        plan = load_plan(config_dir() / "plans" / f"{name}.yaml", wf, models, gpus)
        gpu_name, gpu = plan.gpus.type, gpus[plan.gpus.type]
        seqs = sample_program(wf, args.sample, seed=0)
        source = ProfileSource(wf, models, gpus, sample_mix(seqs), seqs=seqs, shaped=args.arrivals == "requests")
        allocs = {"shipped": dict(plan.allocation), **VARIANTS.get(name, {})}
        print(f"\n== {name} ({gpu_name})")
        print(f"{'allocation':<10} {'rate':>7} {'frac':>5} {'sim lat':>9} {'alp-cp':>9} {'err':>7} {'alp-paper':>9} {'err':>7}")
        for aname, alloc in allocs.items():
            t0 = time.perf_counter()
            profiles = source.for_allocation(alloc, gpu_name)
            graphs = program_graphs(seqs, profiles)
            from scepsy_hpc.trace.stats import aggregate
            stats = aggregate(graphs, wf.name)
            reps = {m: a.replicas for m, a in alloc.items()}
            cap = predict_cp(graphs, profiles, reps, 1e-3, stats)
            t_prof = time.perf_counter() - t0
            for f in FRACTIONS:
                rate = f * cap.throughput_rps
                cp = predict_cp(graphs, profiles, reps, rate, stats)
                pp = predict_paper(stats, profiles, reps, rate)
                sim = simulate(wf, alloc, gpu, models, rate_rps=rate, n_requests=args.requests, seed=args.seed)
                e_cp = cp.latency_s / sim.latency_mean_s - 1
                e_pp = pp.latency_s / sim.latency_mean_s - 1
                rows.append({"workflow": name, "allocation": aname, "frac": f, "rate_rps": rate,
                             "sim_latency_s": sim.latency_mean_s, "alp_cp_s": cp.latency_s, "alp_paper_s": pp.latency_s,
                             "err_cp": e_cp, "err_paper": e_pp})
                print(f"{aname:<10} {rate:7.3f} {f:5.2f} {sim.latency_mean_s:9.2f} {cp.latency_s:9.2f} {e_cp:+7.1%} "
                      f"{pp.latency_s:9.2f} {e_pp:+7.1%}")
            t1 = time.perf_counter()
            calls_per_request = sum(s.n for s in stats.per_llm.values())
            n_cap = max(1000, min(args.cap_requests, int(args.cap_calls / calls_per_request)))
            found = max_sustainable_rate(wf, alloc, gpu, models, cap.throughput_rps, n_requests=n_cap, seed=args.seed)
            e = cap.throughput_rps / found.sustainable_rps - 1
            caps.append({"workflow": name, "allocation": aname, "predicted_rps": cap.throughput_rps,
                         "bottleneck": cap.bottleneck_llm, "sim_sustainable_rps": found.sustainable_rps,
                         "sim_unsustainable_rps": found.unsustainable_rps, "err": e})
            print(f"{aname:<10} capacity: predicted {cap.throughput_rps:.3f} rps (bottleneck {cap.bottleneck_llm}), "
                  f"simulated {found.sustainable_rps:.3f}..{found.unsustainable_rps:.3f} rps, error {e:+.1%} "
                  f"[profiles {t_prof:.1f}s, capacity search {time.perf_counter() - t1:.1f}s, {len(found.runs)} runs]")

    def summary(label: str, errs: list[float]) -> str:
        a = [abs(x) for x in errs]
        return f"{label:<34} median {statistics.median(a):6.1%}   worst {max(a):6.1%}   (n={len(a)})"

    print("\n== summary (absolute errors)")
    print(summary("latency alp-cp", [r["err_cp"] for r in rows]))
    print(summary("latency alp-paper", [r["err_paper"] for r in rows]))
    print(summary("capacity (both predictors)", [c["err"] for c in caps]))
    for name in sorted({r["workflow"] for r in rows}):
        cp = statistics.median(abs(r["err_cp"]) for r in rows if r["workflow"] == name)
        pp = statistics.median(abs(r["err_paper"]) for r in rows if r["workflow"] == name)
        print(f"  {name:<20} median latency error: alp-cp {cp:6.1%}  alp-paper {pp:6.1%}  ratio {pp / cp if cp else float('inf'):5.1f}x")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"latency": rows, "capacity": caps}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
