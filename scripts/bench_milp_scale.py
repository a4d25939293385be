#!/usr/bin/env python3
"""Planning at scale: a synthetic 32-LLM workflow on 1024 GPUs, milp against paper-enum.

The workflow chains 32 LLMs (the catalog's models in turn, each its own deployment) through
stages of fan-outs and tool calls; its target rate is set so that the load needs most of the
GPUs. Profiles are synthesised first (timed apart). Then `scepsy plan`'s two searches run on the
same input: milp (its `solve_time_s`: HiGHS time summed over the critical-path iterations, and
the wall time of the whole plan) and paper-enum under a time cap. Both plans are scored by the
same predictor (alp-cp) at the same rate.

    .venv/bin/python scripts/bench_milp_scale.py [--llms 32] [--gpus 1024] [--enum-cap 60]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scepsy_hpc.allocate import policies  # noqa: E402
from scepsy_hpc.allocate.planner import Demand, Planner, used_gpus  # noqa: E402
from scepsy_hpc.predict.inputs import sample_mix, sample_program  # noqa: E402
from scepsy_hpc.spec.catalog import load_gpus, load_models  # noqa: E402
from scepsy_hpc.spec.source import parse_yaml  # noqa: E402
from scepsy_hpc.spec.workflow import parse_workflow  # noqa: E402

MODELS = ["llama-3.1-8b-instruct", "llama-3.2-3b-instruct", "qwen2.5-7b-instruct", "qwen2.5-14b-instruct",
          "qwen2.5-32b-instruct", "llama-3.1-70b-instruct", "mistral-7b-instruct-v0.3", "qwen2.5-1.5b-instruct"]


def workflow_text(n: int, rate: float) -> str:
    lines = ["name: synthetic_scale", "llms:"]
    lines += [f"  m{i:02d}: {{model: {MODELS[i % len(MODELS)]}}}" for i in range(n)]
    lines += ["tools:", "  lookup: {latency_s: {lognormal: {mean: 0.3, cv: 0.5}}}", f"target: {{throughput_rps: {rate}}}", "program:"]
    for i in range(n):
        p, o = 500 + 97 * (i % 11), 60 + 23 * (i % 7)
        call = f"{{call: m{i:02d}, prompt_tokens: {{normal: {{mean: {p}, sd: {p // 5}}}}}, output_tokens: {{lognormal: {{mean: {o}, cv: 0.5}}}}}}"
        if i % 4 == 1:
            lines += ["  - fanout:", "      count: {uniform_int: {low: 2, high: 6}}", f"      body: [{call}]"]
        elif i % 4 == 3:
            lines += ["  - tool: lookup", f"  - {call}"]
        else:
            lines += [f"  - {call}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llms", type=int, default=32)
    ap.add_argument("--gpus", type=int, default=1024)
    ap.add_argument("--rate", type=float, default=40.0, help="target requests/s (default 40: the busiest LLM at ~60%% of what 1024 GPUs carry)")
    ap.add_argument("--enum-cap", type=float, default=60.0, help="paper-enum time cap, seconds (default 60)")
    ap.add_argument("--calls", type=int, default=600, help="calls per synthetic profile point (default 600)")
    args = ap.parse_args()
    models, gpus = load_models(), load_gpus()
    data, smap = parse_yaml(workflow_text(args.llms, args.rate), "synthetic_scale.yaml")
    wf = parse_workflow(data, smap, models)
    seqs = sample_program(wf, 300, 0)
    t0 = time.perf_counter()
    planner = Planner([Demand(wf, args.rate, sample_mix(seqs), seqs)], models, gpus, "h100-sxm", args.gpus,
                      n_calls=args.calls)
    n_cfg = sum(len(d.configs) for d in planner.deployments.values())
    print(f"{args.llms} LLMs, {n_cfg} profiled configurations, synthesised in {time.perf_counter() - t0:.0f} s")
    rows = []
    for pol, kw in (("milp", {}), ("paper-enum", {"cap_s": args.enum_cap})):
        t = time.perf_counter()
        out = policies.paper_enum(planner, 1.0, **kw) if pol == "paper-enum" else policies.milp(planner, 1.0)
        wall = time.perf_counter() - t
        pred = out.predictions[wf.name]
        rows.append((pol, out, wall))
        print(f"{pol:11s} status {out.status:22s} solve_time_s {out.solve_time_s:7.2f}  wall {wall:6.2f} s  "
              f"GPUs {used_gpus(out.choice):5d}/{args.gpus}  predicted latency {pred.latency_s:7.2f} s  "
              f"throughput {pred.throughput_rps:6.2f} rps" + (f"  ({out.candidates} candidates, {out.iterations} iterations)"
                                                              if pol == "milp" else f"  ({out.candidates} allocations scored)"))
        for n in out.notes:
            print(f"            {n}")
    (_, m, _), (_, e, _) = rows
    lm, le = m.predictions[wf.name].latency_s, e.predictions[wf.name].latency_s
    print(f"milp latency ÷ paper-enum latency = {lm / le:.3f};  paper-enum time ÷ milp solve time = "
          f"{e.solve_time_s / max(m.solve_time_s, 1e-9):.0f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
