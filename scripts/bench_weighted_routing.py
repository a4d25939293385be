#!/usr/bin/env python3
"""Capacity-weighted routing, measured: two unlike replicas of one LLM (a mixed group) under the same load,
routed with their weights and with all weights 1.

    .venv/bin/python scripts/bench_weighted_routing.py [--model llama-3.1-8b-instruct] [--rate 30] [--duration 20]
        [--time-scale 0.25] [--prompt 1024] [--output 128] [--json]

Per mode, two fresh sim engines of `--model` on h100-sxm, one at tp=2 and one on half a GPU (prefix caching
off, so only capacity tells them apart), behind a gateway in this process. Weights: the mixed group's
`perf.fit.replica_weights` (the performance model's capacity estimate; what `scepsy up` writes into the
endpoints file); "unweighted" gives both weight 1 (least outstanding, as before weights). The load: Poisson
arrivals at `--rate` calls per model second for `--duration` model seconds, each a completion of `--prompt`
random prompt tokens and exactly `--output` output tokens; the same seed gives both modes the same arrivals.

Printed side by side: per replica the calls it served and their mean latency, and over all calls the mean,
p50 and p99 latency in model seconds (the gateway's trace: wall / time scale). `--json` prints one JSON document instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from scepsy_hpc.engine.local import SimEngineSpec, sim_engines  # noqa: E402
from scepsy_hpc.gateway import start_gateway  # noqa: E402
from scepsy_hpc.trace.records import read_trace  # noqa: E402

LLM = "gen"
CONFIGS = (("tp=2", {"tp": 2}), ("gpu_frac=0.5", {"gpu_frac": 0.5}))


def weights_for(model: str) -> list[float]:
    """The mixed group's replica weights, as `scepsy up` computes them."""
    from scepsy_hpc.perf.fit import replica_weights
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.plan import LLMAlloc

    return replica_weights([LLMAlloc(**kw) for _, kw in CONFIGS], load_models(None)[model], load_gpus(None)["h100-sxm"])


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def run_mode(args: argparse.Namespace, weights: list[float], tmp: Path) -> dict[str, list[float]]:
    """One mode: fresh engines, a gateway with `weights`, the seeded load; per replica its calls' latencies (model s,
    from the gateway's trace)."""
    specs = [SimEngineSpec(args.model, "h100-sxm", prefix_caching=False, **kw) for _, kw in CONFIGS]  # type: ignore[arg-type]
    with sim_engines(specs, args.time_scale, tmp / "logs") as engines:
        ep, trace = tmp / "endpoints.yaml", tmp / "trace.jsonl"
        reps = "".join(f"      - {{url: {e.url}, weight: {w!r}}}\n" for e, w in zip(engines, weights))
        ep.write_text(f"time_scale: {args.time_scale}\nllms:\n  {LLM}:\n    served_model: {args.model}\n"
                      f"    max_outstanding: 100000\n    replicas:\n{reps}")
        gw = await start_gateway(ep, trace, watch_interval_s=0.0, shutdown_timeout_s=5.0, prefix_affinity=False)
        rng = random.Random(args.seed)
        arrivals, t = [], rng.expovariate(args.rate)
        while t < args.duration:
            arrivals.append(t)
            t += rng.expovariate(args.rate)
        prompts = [[rng.randrange(1000, 30000) for _ in range(args.prompt)] for _ in range(8)]
        try:
            async with aiohttp.ClientSession(trust_env=False, connector=aiohttp.TCPConnector(limit=0)) as http:
                async def call(i: int) -> None:
                    body = {"model": LLM, "prompt": prompts[i % len(prompts)], "max_tokens": args.output}
                    async with http.post(gw.url + "/v1/completions", json=body) as r:
                        await r.read()
                        if r.status != 200:
                            raise RuntimeError(f"call {i}: HTTP {r.status}")

                start = time.monotonic()
                tasks = []
                for i, at in enumerate(arrivals):
                    await asyncio.sleep(max(0.0, start + at * args.time_scale - time.monotonic()))
                    tasks.append(asyncio.create_task(call(i)))
                await asyncio.gather(*tasks)
        finally:
            await gw.close()
        by_url = {e.url: name for e, (name, _) in zip(engines, CONFIGS)}
        out: dict[str, list[float]] = {name: [] for name, _ in CONFIGS}
        for c in read_trace(trace).calls:
            out[by_url[c.replica or ""]].append(c.duration_s)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b-instruct")
    ap.add_argument("--rate", type=float, default=30.0, help="calls per model second (Poisson)")
    ap.add_argument("--duration", type=float, default=20.0, help="model seconds of arrivals")
    ap.add_argument("--time-scale", type=float, default=0.25)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    weighted = weights_for(args.model)
    out: dict[str, Any] = {"model": args.model, "weights": dict(zip([n for n, _ in CONFIGS], weighted)),
                           "rate": args.rate, "duration_s": args.duration, "time_scale": args.time_scale, "modes": {}}
    for mode, ws in (("weighted", weighted), ("unweighted", [1.0, 1.0])):
        with tempfile.TemporaryDirectory() as tmp:
            res = asyncio.run(run_mode(args, ws, Path(tmp)))
        lat = [x for xs in res.values() for x in xs]
        out["modes"][mode] = {"calls": {k: len(v) for k, v in res.items()},
                              "mean_s_by_replica": {k: statistics.fmean(v) if v else None for k, v in res.items()},
                              "mean_s": statistics.fmean(lat), "p50_s": _pct(lat, 0.5), "p99_s": _pct(lat, 0.99)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.model}, tp=2 + gpu_frac=0.5, weights {weighted[0]:.1f} : {weighted[1]:.1f}; "
          f"{args.rate:g} calls/s for {args.duration:g} s, {args.prompt}+{args.output} tokens")
    print(f"{'mode':<11} {'calls tp=2':>10} {'calls half':>10} {'tp=2:half':>9} {'mean tp=2':>9} {'mean half':>9} "
          f"{'mean s':>7} {'p50 s':>7} {'p99 s':>7}")
    for mode, m in out["modes"].items():
        a, b = m["calls"]["tp=2"], m["calls"]["gpu_frac=0.5"]
        ma, mb = m["mean_s_by_replica"]["tp=2"], m["mean_s_by_replica"]["gpu_frac=0.5"]
        print(f"{mode:<11} {a:>10} {b:>10} {a / max(1, b):>9.2f} {ma or float('nan'):>9.2f} {mb or float('nan'):>9.2f} "
              f"{m['mean_s']:>7.2f} {m['p50_s']:>7.2f} {m['p99_s']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
