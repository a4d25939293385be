#!/usr/bin/env python3
"""The whole loop on the embedded default, as a user types it, then measured against predicted:

1. `scepsy plan` the shipped openai-SDK example workflow (examples/openai_fanout: a planner, k parallel
   searcher lanes with a web-search tool, a writer) for a target rate on the local cluster spec;
2. `scepsy up` the plan: the daemon (started if none runs) serves it on the local backend with
   simulated engines, behind its gateway;
3. `scepsy drive --driver entrypoint`: the example's real `openai` SDK code, once per request, through
   the gateway (open loop at the planned rate);
4. the measured latency and throughput beside the plan's prediction.

The deployment is left running (`scepsy status --watch` shows it live); `scepsy down demo` stops it and
`scepsy daemon stop --all` stops the daemon and the gateway too. `--stop` does both at the end.

    python scripts/serve_demo.py [--rate 2] [--requests 60] [--time-scale 0.1] [--name demo] [--stop]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCEPSY = [sys.executable, "-m", "scepsy_hpc.cli"]
WORKFLOW = ROOT / "examples" / "openai_fanout" / "workflow.yaml"


def scepsy(*args: str, state: str | None) -> str:
    """Run a `scepsy` command, showing it; its stdout (exit on failure with its stderr)."""
    extra = ["--state-dir", state] if state else []
    print(f"$ scepsy {' '.join(args)}", flush=True)
    done = subprocess.run([*SCEPSY, *args, *extra], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"scepsy {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=2.0, help="target and offered rate, requests/s (default 2)")
    ap.add_argument("--requests", type=int, default=60, help="requests to drive (default 60)")
    ap.add_argument("--time-scale", type=float, default=0.1, help="wall seconds per model second (default 0.1)")
    ap.add_argument("--name", default="demo", help="deployment name (default demo)")
    ap.add_argument("--state-dir", help="the daemon's state dir (default $SCEPSY_STATE_DIR, else ~/.scepsy/HOST)")
    ap.add_argument("--stop", action="store_true", help="stop the deployment, the daemon and the gateway at the end")
    args = ap.parse_args()
    plan = Path(tempfile.mkdtemp(prefix="scepsy-demo-")) / "plan.yaml"
    summary = json.loads(scepsy("plan", str(WORKFLOW), "--cluster", "local", "--target-rps", f"{args.rate:g}", "-o",
                                str(plan), "--json", state=None))
    pred = summary.get("predicted") or {}
    parts = [f"{k} tp{v['tp']}x{v['replicas']}" + (f" at {v['gpu_frac']:g} GPU" if v["gpu_frac"] < 1 else "")
             for k, v in summary["allocation"].items()]
    print(f"  planned {', '.join(parts)}: {summary.get('gpus_used')} of {summary.get('gpus_total')} GPUs; predicted "
          f"{pred.get('latency_s', 0):.2f} s per request at {args.rate:g} req/s, capacity {pred.get('throughput_rps', 0):.1f} req/s")
    if _exists(args):   # a demo from an earlier run: stop it first
        scepsy("down", args.name, state=args.state_dir)
    scepsy("up", str(plan), "--name", args.name, "--detach", "--time-scale", f"{args.time_scale:g}", state=args.state_dir)
    t0 = time.monotonic()
    while True:
        doc = json.loads(subprocess.run([*SCEPSY, "status", args.name, "--json", *_sd(args)], capture_output=True,
                                        text=True).stdout or "{}")
        if doc.get("state") == "serving":
            break
        if doc.get("state") == "failed" or time.monotonic() - t0 > 300:
            sys.exit(f"{args.name} did not serve: {doc.get('error') or doc.get('state')}")
        time.sleep(0.2)
    print(f"  serving after {time.monotonic() - t0:.1f} s: {doc['base_url']} "
          f"({len(doc['instances'])} engines, job {doc['job_id']}); its key: "
          f"`export OPENAI_API_KEY=$(scepsy keys show {args.name}{' --state-dir ' + args.state_dir if args.state_dir else ''})`"
          " (`scepsy drive` fetches it itself)")
    drive = json.loads(scepsy("drive", args.name, "--driver", "entrypoint", "--requests", str(args.requests), "--rate",
                              f"{args.rate:g}", "--json", state=args.state_dir))
    # At an offered rate below capacity the plan predicts that every request is carried: throughput = the rate.
    # The measured figure divides the requests by the whole drive, arrivals plus the last requests' latency.
    carried = min(args.rate, pred["throughput_rps"]) if pred.get("throughput_rps") else None
    rows = [("latency mean (s)", pred.get("latency_s"), drive["latency_mean_s"]),
            ("throughput (req/s)", carried, drive["throughput_rps"])]
    print(f"\n{'':22}{'predicted':>11}{'measured':>11}{'ratio':>8}")
    for label, p, m in rows:
        ratio = f"{m / p:.2f}" if p and m else "-"
        print(f"{label:22}{_f(p):>11}{_f(m):>11}{ratio:>8}")
    print(f"\n{drive['ok']}/{drive['requests']} requests ok in {drive['duration_s']:.1f} s of model time (Poisson arrivals "
          f"at {args.rate:g} req/s; the sim engines ran at time scale {args.time_scale:g}).\nMeasured throughput counts "
          f"the drive's whole span, the last requests' latency included, so it reads a little under the rate.")
    if args.stop:
        scepsy("daemon", "stop", "--all", state=args.state_dir)
    else:
        sd = f" --state-dir {args.state_dir}" if args.state_dir else ""
        print(f"\nleft running: `scepsy status --watch{sd}`, `scepsy down {args.name}{sd}`, "
              f"`scepsy daemon stop --all{sd}` (stops the daemon and the gateway too)")
    return 0 if drive["errors"] == 0 else 1


def _sd(args: argparse.Namespace) -> list[str]:
    return ["--state-dir", args.state_dir] if args.state_dir else []


def _exists(args: argparse.Namespace) -> bool:
    done = subprocess.run([*SCEPSY, "status", args.name, "--json", *_sd(args)], capture_output=True, text=True)
    try:
        return json.loads(done.stdout).get("state") not in (None, "stopped", "failed")
    except ValueError:
        return False


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
