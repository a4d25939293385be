#!/usr/bin/env python3
"""Is the simulator still the same, bit for bit? A digest of simulations on fixed plans, to run before and
after a change that should only make the simulator faster (or on two commits: PYTHONPATH=<worktree>).

For each workflow, its plan DIR/W.yaml (written first when missing: `scepsy plan W --gpus G --max-throughput
--no-sim-check`, so the same files serve both sides) is simulated at 0.7× and 1.05× its predicted capacity
(below and past it), N requests, seed 1, with every call recorded; the figures, the per-LLM statistics and
every call record go into one SHA-256 per workflow. The same digests mean the same simulations: the same
table cells, the same simulator checks.

    .venv/bin/python scripts/sim_digest.py --plans /tmp/plans > before.txt
    PYTHONPATH=/path/to/other/worktree .venv/bin/python scripts/sim_digest.py --plans /tmp/plans --against before.txt
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

from scepsy_hpc.errors import ScepsyError, SpecError
from scepsy_hpc.sim import simulate
from scepsy_hpc.spec.catalog import config_dir, load_gpus, load_models, shipped_names
from scepsy_hpc.spec.plan import load_plan
from scepsy_hpc.spec.workflow import load_workflow


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", required=True, type=Path, help="folder of plan files W.yaml (missing ones are written)")
    ap.add_argument("--workflows", default=None, help="comma-separated shipped workflows (default: all)")
    ap.add_argument("--gpus", type=int, default=16, help="GPUs of the plans written (default 16)")
    ap.add_argument("--requests", type=int, default=200, help="requests per simulation (default 200)")
    ap.add_argument("--against", type=Path, help="an earlier output of this script: exit 1 when a digest differs")
    args = ap.parse_args()
    if not 1 <= args.requests <= 100_000 or not 1 <= args.gpus <= 100_000:
        ap.error(f"--requests {args.requests} / --gpus {args.gpus}: each from 1 to 100,000")
    try:
        names = shipped_names("workflows", args.workflows or None)
    except SpecError as exc:
        ap.error(f"--workflows: {exc}")
    before = {}
    if args.against is not None:
        try:
            before = dict(line.split()[:2] for line in args.against.read_text().splitlines() if len(line.split()) == 2)
        except OSError as e:
            ap.error(f"--against {args.against}: {e.strerror}")
    args.plans.mkdir(parents=True, exist_ok=True)
    models, gpus = load_models(None), load_gpus(None)
    differ = 0
    for w in names:
        f = args.plans / f"{w}.yaml"
        if not f.exists():
            cmd = [sys.executable, "-m", "scepsy_hpc.cli", "plan", w, "--gpus", str(args.gpus), "--max-throughput",
                   "--no-sim-check", "-o", str(f)]
            if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
                print(f"{w}: `{' '.join(cmd[2:])}` failed", file=sys.stderr)
                return 2
        wf = load_workflow(config_dir() / "workflows" / f"{w}.yaml", models)
        try:
            plan = load_plan(f, wf, models, gpus)
            rate = float(plan.predicted["throughput_rps"])
        except (ScepsyError, KeyError, TypeError, ValueError) as e:
            print(f"{f}: not a plan of {w} with a predicted throughput ({e}); remove it to have it written again",
                  file=sys.stderr)
            return 2
        h = hashlib.sha256()
        for frac in (0.7, 1.05):
            r = simulate(wf, plan.allocation, gpus[plan.gpus.type], models, rate_rps=rate * frac,
                         n_requests=args.requests, seed=1, record_calls=True)
            h.update(repr((r.throughput_rps, r.latency_mean_s, r.latency_p99_s, r.llm_calls, r.events)).encode())
            h.update(repr(sorted(r.per_llm.items())).encode())
            h.update(repr(r.call_records).encode())
        d = h.hexdigest()[:16]
        mark = "" if w not in before else ("  same" if before[w] == d else f"  DIFFERS (was {before[w]})")
        differ += mark.startswith("  DIFFERS")
        print(f"{w} {d}{mark}", flush=True)
    if before:
        print(f"{differ} of {len(names)} differ", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
