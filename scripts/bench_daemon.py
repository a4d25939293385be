#!/usr/bin/env python3
"""The daemon's costs, measured side by side in one run (a benchmark script, not a test):

1. Slurm commands per reconcile cycle with 1, 5 and 20 deployments (target: at most 2 whatever the
   count): while every job is queued, and in the cycle after half of them left the queue. Against the
   real Slurm when `sinfo` answers (jobs are `sleep` jobs), else the shipped FakeSlurm (said so).
2. The daemon's CPU while idle over `--idle-s` seconds (default 60): with no deployment, and with one
   local deployment serving (sim engines, polled every second); the gateway's beside it.
3. Time from `scepsy up` to serving: on the local backend, and on the local Slurm when it answers.
4. Time to adopt after `kill -9` of the daemon: from `scepsy daemon start` to every deployment
   `serving` again with the same job ids.

    python scripts/bench_daemon.py [--idle-s 60] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCEPSY = [sys.executable, "-m", "scepsy_hpc.cli"]
CLK = os.sysconf("SC_CLK_TCK")


def scepsy(state: Path, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*SCEPSY, *args, "--state-dir", str(state)], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise SystemExit(f"scepsy {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    done = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return done.returncode == 0 and "is UP" in done.stdout


def commands_per_cycle(counts: list[int], real: bool) -> list[dict[str, Any]]:
    """Slurm commands the daemon's cycle runs with n deployments, queued and after half left."""
    from scepsy_hpc.backend.slurm import SlurmBackend
    from scepsy_hpc.service.daemon import Daemon
    from scepsy_hpc.service.paths import StatePaths
    from scepsy_hpc.service.state import Deployment, Job

    from scepsy_hpc.backend.records import ServeConfig, ServeInstance
    from scepsy_hpc.backend.session import Session
    from scepsy_hpc.engine.adapters import EngineLaunch

    launch = EngineLaunch(engine="sim", model="llama-3.1-8b", hf_id="meta-llama/Llama-3.1-8B-Instruct",
                          served_name="m", gpu="h100-sxm")
    shape = ServeConfig(engine="sim", health_timeout_s=60.0, instances=[ServeInstance(
        llm="m", replica=0, node="node1", gpus=[0], gpu_frac=1.0, mps_pct=100, port=8000, launch=launch)])
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            paths = StatePaths(Path(tmp))
            paths.ensure()
            ids: list[tuple[str, str]] = []
            if real:
                backend = SlurmBackend()
                for i in range(n):
                    name = f"scepsy-bench{i}-{os.getpid()}"
                    out = subprocess.run(["sbatch", "--parsable", "-J", name, "-p", "gpu", "--hold", "-o", "/dev/null", "--wrap", "sleep 600"],
                                         capture_output=True, text=True, check=True).stdout.strip()
                    ids.append((out.split(";")[0], name))
            else:
                from scepsy_hpc.backend.fake import FakeSlurm

                fake = FakeSlurm()
                backend = SlurmBackend(run=fake, sleep=lambda s: None)
                for i in range(n):
                    name = f"scepsy-bench{i}"
                    script = Path(tmp) / f"{i}.sh"
                    script.write_text(f"#!/bin/bash\n#SBATCH --job-name={name}\nsleep 600\n")
                    ids.append((fake(["sbatch", "--parsable", str(script)]).strip(), name))
            daemon = Daemon(paths, backends={"slurm": backend})
            for i, (job_id, name) in enumerate(ids):
                session = Session(paths.session_dir(f"d{i}"))
                session.dir.mkdir(parents=True)
                session.write_serve_config(shape)   # one engine on node1: the job above serves it
                daemon.store.add_deployment(Deployment(name=f"d{i}", state="pending", session_dir=str(session.dir)))
                daemon.store.add_job(Job(job_id=job_id, deployment=f"d{i}", backend="slurm", name=name, state="PENDING",
                                         unit="node1"))

            async def cycles() -> tuple[int, int]:
                import aiohttp

                daemon._http = aiohttp.ClientSession()
                try:
                    daemon.gateway.alive = lambda: True   # the gateway is not part of this count
                    await daemon.cycle()   # the first cycle learns each job's submit time
                    before = len(backend.calls)
                    await daemon.cycle()
                    queued = len(backend.calls) - before
                    for job_id, _ in ids[: max(1, n // 2)]:
                        if real:
                            subprocess.run(["scancel", job_id], check=True)
                        else:
                            fake.finish(job_id, "CANCELLED")
                    if real:
                        time.sleep(2.0)
                    before = len(backend.calls)
                    await daemon.cycle()
                    return queued, len(backend.calls) - before
                finally:
                    await daemon._http.close()

            try:
                queued, left = asyncio.run(cycles())
            finally:
                if real:
                    subprocess.run(["scancel", *[j for j, _ in ids]], check=False)
                daemon.store.close()
            rows.append({"deployments": n, "slurm": "real" if real else "FakeSlurm", "commands_per_cycle_queued": queued,
                         "commands_in_cycle_after_half_left": left})
    return rows


def plan(tmp: Path, name: str, nodes: tuple[str, str]) -> Path:
    import yaml

    a, b = nodes
    data = {"workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 5},
            "allocation": {"generator": {"tp": 4}, "rewriter": {"gpu_frac": 0.5}, "reranker": {"gpu_frac": 0.5}},
            "placement": [{"llm": "generator", "replica": 0, "node": a, "gpus": [0, 1, 2, 3]},
                          {"llm": "rewriter", "replica": 0, "node": b, "gpus": [0]},
                          {"llm": "reranker", "replica": 0, "node": b, "gpus": [0]}]}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_serving(state: Path, names: list[str], timeout_s: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        docs = {n: json.loads(subprocess.run([*SCEPSY, "status", n, "--json", "--state-dir", str(state)],
                                             capture_output=True, text=True).stdout) for n in names}
        if all(d.get("state") == "serving" for d in docs.values()):
            return docs
        time.sleep(0.1)
    raise SystemExit(f"not serving after {timeout_s} s: {names}")


def serving_figures(idle_s: float, backend: str) -> dict[str, Any]:
    """Idle CPU, up → serving, and adoption time, on `backend`."""
    out: dict[str, Any] = {"backend": backend}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        state = tmp / "state"
        nodes = ("node1", "node2")   # nodes of the cluster spec (local), which `up` checks the placement against
        try:
            doc = json.loads(scepsy(state, "daemon", "start", "--json").stdout)
            pid, gw = doc["pid"], doc["gateway"]["pid"]
            if backend == "local":
                c0, g0 = cpu_s(pid), cpu_s(gw)
                time.sleep(idle_s)
                out["idle_cpu_pct_no_deployment"] = round(100 * (cpu_s(pid) - c0) / idle_s, 3)
                out["gateway_idle_cpu_pct"] = round(100 * (cpu_s(gw) - g0) / idle_s, 3)
            t0 = time.monotonic()
            scepsy(state, "up", str(plan(tmp, "b1", nodes)), "--name", "b1", "--detach", "--backend", backend,
                   "--time-scale", "0.05")
            first = wait_serving(state, ["b1"])
            out["up_to_serving_s"] = round(time.monotonic() - t0, 2)
            if backend == "local":
                c0 = cpu_s(pid)
                time.sleep(idle_s)
                out["idle_cpu_pct_one_deployment_serving"] = round(100 * (cpu_s(pid) - c0) / idle_s, 3)
            out["idle_window_s"] = idle_s
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            t0 = time.monotonic()
            again = json.loads(scepsy(state, "daemon", "start", "--json").stdout)
            answered = time.monotonic() - t0
            docs = wait_serving(state, ["b1"])
            while json.loads(subprocess.run([*SCEPSY, "daemon", "status", "--json", "--state-dir", str(state)],
                                            capture_output=True, text=True).stdout)["cycles"] < 1:
                time.sleep(0.05)
            out["adopt_daemon_answers_s"] = round(answered, 2)
            out["adopt_to_serving_s"] = round(time.monotonic() - t0, 2)
            out["adopted_same_job"] = docs["b1"]["job_id"] == first["b1"]["job_id"]
            out["adopted_same_gateway"] = again["gateway"]["pid"] == gw
        finally:
            subprocess.run([*SCEPSY, "daemon", "stop", "--all", "--state-dir", str(state)], capture_output=True, timeout=300)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    real = slurm_up()
    result = {"commands": commands_per_cycle([1, 5, 20], real), "local": serving_figures(args.idle_s, "local")}
    if real:
        result["slurm"] = serving_figures(min(args.idle_s, 5.0), "slurm")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("Slurm commands per reconcile cycle (" + ("real Slurm" if real else "FakeSlurm: no Slurm here") + ")")
    print(f"  {'deployments':>11}  {'all queued':>10}  {'after half left':>15}")
    for r in result["commands"]:
        print(f"  {r['deployments']:>11}  {r['commands_per_cycle_queued']:>10}  {r['commands_in_cycle_after_half_left']:>15}")
    for key in ("local", "slurm"):
        if key in result:
            print(f"{key}: " + ", ".join(f"{k} {v}" for k, v in result[key].items() if k != "backend"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
