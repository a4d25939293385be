#!/usr/bin/env python3
"""MILP solve time at scale: 32 LLMs, random but plausible candidate sets, 600–1024 GPUs.

Candidates per LLM: tp ∈ {1,2,4,8}, fractions {¼,½,¾,1} at tp=1, 40 replica counts from the
smallest that carries a random load; cost falls with tp and replicas like a loaded engine's.
Prints candidates, status, objective and solve time (model building included) per budget.

    .venv/bin/python scripts/bench_milp_scale.py [--llms 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scepsy_hpc.allocate.milp import Candidate, solve  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llms", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    cands: dict[str, list[Candidate]] = {}
    for m in range(args.llms):
        base, load = rng.uniform(5, 50), rng.uniform(1, 30)
        cs = []
        for tp in (1, 2, 4, 8):
            for f in ((0.25, 0.5, 0.75, 1.0) if tp == 1 else (1.0,)):
                mu = tp ** 0.8 * f * rng.uniform(0.8, 1.2)
                r0 = max(1, int(load / mu) + 1)
                cs += [Candidate("h100-sxm", tp, f, r, base / tp ** 0.5 / f ** 0.3 * (1 + (load / (r * mu)) ** 3))
                       for r in range(r0, r0 + 40)]
        cands[f"m{m}"] = cs
    print(f"{args.llms} LLMs, {sum(len(c) for c in cands.values())} candidates")
    for n in (600, 800, 1024):
        r = solve(cands, {"h100-sxm": n})
        print(f"{n:5d} GPUs: {r.status}, objective {r.objective_s:.2f} s, solve {r.solve_time_s:.2f} s, used {r.gpus_used()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
