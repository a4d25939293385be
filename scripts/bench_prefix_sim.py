#!/usr/bin/env python3
"""Prefix caching in the simulator: a ReAct agent (8 steps, each re-sending the conversation) with and
without prefix reuse, and prefix-affinity routing on and off.

    python scripts/bench_prefix_sim.py                       # rates 2 4 8 12 16 rps, 1500 requests each
    python scripts/bench_prefix_sim.py --rates 4 8 --requests 800 --replicas 2

The workflow: a 600-token first prompt of which 512 are a system prompt shared by every request, then
7 steps each adding a tool result of 100 tokens; every answer is 60 tokens; a tool wait (exponential,
mean 0.3 s) between steps. "reuse" runs it with `context`/`shared_prefix_tokens`; "none" runs the same
calls with the same prompt sizes charged in full (no segments, no prefix cache). Each rate prints p50/p99
latency, throughput, hit rate and prefill tokens computed side by side (none / reuse), then the affinity
comparison on `--replicas` replicas (reuse both ways). One allocation: llama-3.1-8b-instruct, full H100.
"""

from __future__ import annotations

import argparse
import sys

from scepsy_hpc.sim import simulate
from scepsy_hpc.spec.catalog import load_gpus, load_models
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import workflow_from_text

STEPS, FIRST, SHARED, NEW, OUT, TOOL_S = 8, 600, 512, 100, 60, 0.3
MODEL = "llama-3.1-8b-instruct"


def react(reuse: bool) -> str:
    """The ReAct workflow; without reuse every step's prompt is given in full (same token counts)."""
    head = f"name: react{STEPS}\nllms: {{agent: {{model: {MODEL}}}}}\ntools: {{act: {{latency_s: {{exponential: {{mean: {TOOL_S}}}}}}}}}\nprogram:\n"
    lines = []
    for k in range(STEPS):
        if k:
            lines.append("  - {tool: act}")
        if reuse:
            extra = f", shared_prefix_tokens: {SHARED}" if k == 0 else ""
            lines.append(f"  - {{call: agent, context: c{extra}, prompt_tokens: {FIRST if k == 0 else NEW}, output_tokens: {OUT}}}")
        else:
            lines.append(f"  - {{call: agent, prompt_tokens: {FIRST + k * (OUT + NEW)}, output_tokens: {OUT}}}")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="*", default=[2, 4, 8, 12, 16])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--replicas", type=int, default=2, help="replicas for the affinity comparison")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    models, gpus = load_models(), load_gpus()
    gpu = gpus["h100-sxm"]
    wfs = {"none": workflow_from_text(react(False), models), "reuse": workflow_from_text(react(True), models)}

    def run(wf, rate, alloc, **kw):
        return simulate(wf, {"agent": alloc}, gpu, models, rate_rps=rate, n_requests=args.requests, seed=args.seed, **kw)

    def row(label, r):
        s = r.per_llm["agent"]
        return (f"{label:>10} {r.latency_p50_s:8.2f} {r.latency_p99_s:8.2f} {r.throughput_rps:8.2f} {s.prefix_hit_rate:6.1%} "
                f"{s.prefill_tokens / max(r.completed, 1):10.0f}")

    hdr = f"{'':>10} {'p50 s':>8} {'p99 s':>8} {'thr rps':>8} {'hit':>6} {'prefill/req':>10}"
    print(f"ReAct {STEPS} steps, {MODEL} on one H100 (1 replica), {args.requests} requests per rate, seed {args.seed}")
    for rate in args.rates:
        a, b = run(wfs["none"], rate, LLMAlloc()), run(wfs["reuse"], rate, LLMAlloc())
        print(f"-- rate {rate:g} rps\n{hdr}\n{row('none', a)}\n{row('reuse', b)}")
        print(f"{'reuse/none':>10} {b.latency_p50_s / a.latency_p50_s:8.2f} {b.latency_p99_s / a.latency_p99_s:8.2f} "
              f"{b.throughput_rps / a.throughput_rps:8.2f} {'':>6} "
              f"{b.per_llm['agent'].prefill_tokens / max(a.per_llm['agent'].prefill_tokens, 1) * a.completed / max(b.completed, 1):10.2f}")
    print(f"\nprefix affinity, reuse workflow, {args.replicas} replicas")
    for rate in args.rates:
        alloc = LLMAlloc(replicas=args.replicas)
        on, off = run(wfs["reuse"], rate * args.replicas, alloc), run(wfs["reuse"], rate * args.replicas, alloc, prefix_affinity=False)
        print(f"-- rate {rate * args.replicas:g} rps\n{hdr}\n{row('affinity', on)}\n{row('no aff.', off)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
