#!/usr/bin/env python3
"""Continuity under load, measured (a benchmark script, not a test): each scenario serves a deployment
with the daemon, sends a steady load of chat calls (half streamed) through the gateway the whole time,
makes one thing go wrong, and prints what the clients saw.

    walltime      a 3-minute walltime driven for 7 minutes: cut-overs (replacement first, then drain)
    no-room       the same while a blocker job holds every other node: replaced node by node
    engine-crash  kill -9 of one engine: its agent restarts it
    wedged        one engine stops making progress (the sim engine's wedge fault): detected, restarted
    lost-node     `scontrol update state=down` of a node under the deployment: re-placed elsewhere
    scancel       a job cancelled from outside, three times: resubmitted twice, then the breaker opens
    daemon-kill   kill -9 of the daemon during a cut-over: the next daemon completes it

Per scenario: `sent`, `failed` (and why), p99 latency before and during the event, `recovery_s` (from
the event until every LLM has its planned engines taking calls again), and what the daemon did.

    python scripts/bench_continuity.py [--scenario S ...] [--json] [--drive-s 420] [--rps 5]

Needs the local Slurm (`sudo scripts/slurm-local.sh start`); its 4 nodes × 4 GPUs are the cluster.
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
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCEPSY = [sys.executable, "-m", "scepsy_hpc.cli"]
LLMS = ("generator", "rewriter", "reranker")
TIME_SCALE = "0.05"
SCENARIOS = ("walltime", "no-room", "engine-crash", "wedged", "lost-node", "scancel", "daemon-kill")


class Failed(Exception):
    """A scenario could not run to its end (the row says why)."""


# the wedged scenario wedges an engine through the sim engine's test hook, which works only for engines started for
# tests: the daemon and its jobs inherit this environment
HOOKS_ENV = {**os.environ, "SCEPSY_SIM_TEST_HOOKS": "1"}


def scepsy(state: Path, *args: str, timeout_s: float = 300.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*SCEPSY, *args, "--state-dir", str(state)], capture_output=True, text=True, timeout=timeout_s,
                          env=HOOKS_ENV)
    if check and done.returncode != 0:
        raise Failed(f"scepsy {' '.join(args)} failed ({done.returncode}): {(done.stderr + done.stdout).strip()[-1500:]}")
    return done


def status(state: Path, name: str) -> dict[str, Any]:
    """`scepsy status NAME --json` (it exits 1 while the deployment does not serve: that is not a failure here)."""
    done = scepsy(state, "status", name, "--json", check=False)
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        raise Failed(f"scepsy status {name} --json printed no JSON ({done.returncode}): {done.stderr[-1500:]}") from None
    if "error" in doc and "name" not in doc:
        raise Failed(f"scepsy status {name}: {doc['error']}")
    return doc


def events(state: Path, name: str) -> list[dict[str, Any]]:
    return json.loads(scepsy(state, "events", name, "--json", "--limit", "10000").stdout)


def full(doc: dict[str, Any]) -> bool:
    """Every LLM has its planned engines taking calls."""
    cap = doc.get("continuity", {}).get("capacity") or {}
    return bool(cap) and all(c["now"] >= c["plan"] for c in cap.values())


def wait_for(what: str, cond: Callable[[], bool], timeout_s: float, every_s: float = 0.5) -> float:
    """Seconds until `cond()` held; Failed after `timeout_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if cond():
            return time.monotonic() - t0
        time.sleep(every_s)
    raise Failed(f"{what}: not within {timeout_s:g} s")


def slurm_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo is not on PATH"
    done = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return None if done.returncode == 0 and "is UP" in done.stdout else f"scontrol ping: {done.stdout.strip()}"


def plan_one_copy(path: Path, a: str, b: str) -> Path:
    """rag_rerank on two nodes: the generator at tp=4 on `a`, the other two sharing GPU 1 of `b`."""
    path.write_text(yaml.safe_dump({
        "workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 5},
        "allocation": {"generator": {"tp": 4}, "rewriter": {"gpu_frac": 0.5}, "reranker": {"gpu_frac": 0.5}},
        "placement": [{"llm": "generator", "replica": 0, "node": a, "gpus": [0, 1, 2, 3]},
                      {"llm": "rewriter", "replica": 0, "node": b, "gpus": [1]},
                      {"llm": "reranker", "replica": 0, "node": b, "gpus": [1]}]}))
    return path


def plan_two_copies(path: Path, a: str, b: str) -> Path:
    """rag_rerank with every LLM on both nodes (3 of their 4 GPUs): either node serves all three alone."""
    placement = []
    for replica, node in enumerate((a, b)):
        placement += [{"llm": "generator", "replica": replica, "node": node, "gpus": [0, 1]},
                      {"llm": "rewriter", "replica": replica, "node": node, "gpus": [2]},
                      {"llm": "reranker", "replica": replica, "node": node, "gpus": [2]}]
    path.write_text(yaml.safe_dump({
        "workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 6},
        "allocation": {"generator": {"tp": 2, "replicas": 2}, "rewriter": {"gpu_frac": 0.5, "replicas": 2},
                       "reranker": {"gpu_frac": 0.5, "replicas": 2}},
        "placement": placement}))
    return path


class Run:
    """One scenario: a state dir with its daemon, one deployment, a steady load, a capacity sampler."""

    def __init__(self, work: Path, name: str, rps: float) -> None:
        self.state = work / name / "state"
        self.state.parent.mkdir(parents=True)
        self.name = name
        self.rps = rps
        self.base = ""
        self.key = ""
        self.t_event: float | None = None
        self.t_recovered: float | None = None
        self.min_capacity: dict[str, int] = {}
        self._stop = threading.Event()
        self.load: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def up(self, plan: Path, *extra: str) -> dict[str, Any]:
        scepsy(self.state, "daemon", "start", "--poll", "1")
        scepsy(self.state, "up", str(plan), "--backend", "slurm", "--name", self.name, "--detach",
               "--time-scale", TIME_SCALE, *extra)
        wait_for(f"{self.name} serving", lambda: status(self.state, self.name)["state"] == "serving", 240)
        doc = status(self.state, self.name)
        self.base = doc["base_url"]
        self.key = scepsy(self.state, "keys", "show", self.name).stdout.strip()   # the owner key `up` made
        return doc

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            try:
                doc = status(self.state, self.name)
            except (Failed, ValueError, subprocess.TimeoutExpired):
                continue
            for llm, c in (doc.get("continuity", {}).get("capacity") or {}).items():
                self.min_capacity[llm] = min(self.min_capacity.get(llm, c["now"]), c["now"])

    def start_load(self) -> None:
        from scepsy_hpc.drive.steady import SteadyLoad

        self.loop = asyncio.new_event_loop()
        self.load = SteadyLoad(self.base, LLMS, self.rps, stream_share=0.5, max_tokens=8, timeout_s=120.0,
                               api_key=self.key)
        started = threading.Event()

        def body() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.load.start())
            started.set()
            self.loop.run_forever()

        threading.Thread(target=body, daemon=True).start()
        started.wait(30)
        threading.Thread(target=self._sample, daemon=True).start()

    def now(self) -> float:
        return self.load.now()

    def mark_event(self) -> None:
        self.t_event = self.now()

    def recovered(self, timeout_s: float) -> float:
        """Seconds from the event until full capacity again."""
        assert self.t_event is not None
        wait_for("full capacity again", lambda: full(status(self.state, self.name)), timeout_s)
        self.t_recovered = self.now()
        return self.t_recovered - self.t_event

    def stop_load(self) -> list[Any]:
        self._stop.set()
        fut = asyncio.run_coroutine_threadsafe(self.load.stop(), self.loop)
        records = fut.result(timeout=300)
        self.loop.call_soon_threadsafe(self.loop.stop)
        return records

    def row(self, records: list[Any], **extra: Any) -> dict[str, Any]:
        from scepsy_hpc.drive.steady import gaps, summary

        s = summary(records)
        before = summary(records, None, self.t_event) if self.t_event is not None else s
        during = summary(records, self.t_event, self.t_recovered) if self.t_event is not None else {}
        return {"scenario": self.name, "sent": s["sent"], "failed": s["failed"], "failures": s["failures"],
                "p99_before_s": before.get("p99_s"), "p99_during_s": during.get("p99_s") if during else None,
                "recovery_s": round(self.t_recovered - self.t_event, 2) if self.t_recovered and self.t_event else None,
                "longest_gap_s": {m: round(gaps(records, m).length_s, 2) for m in LLMS},
                "min_capacity": dict(self.min_capacity), **extra}

    def close(self) -> None:
        self._stop.set()
        scepsy(self.state, "daemon", "stop", "--all", timeout_s=300, check=False)


def _kinds(evs: list[dict[str, Any]], *kinds: str) -> dict[str, int]:
    return {k: sum(1 for e in evs if e["kind"] == k) for k in kinds}


def sc_walltime(run: Run, work: Path, drive_s: float, no_room: bool = False) -> dict[str, Any]:
    blocker = None
    if no_room:   # every GPU of node3 and node4 held: the cluster cannot take a second copy
        blocker = subprocess.run(["sbatch", "--parsable", "-J", "scepsy-bench-blocker", "-N", "2", "-w", "node3,node4",
                                  "--gres=gpu:h100:4", "-t", "30:00", "--wrap", "sleep 1800"],
                                 capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
        wait_for("blocker running", lambda: "RUNNING" in subprocess.run(
            ["squeue", "-h", "-j", blocker, "-o", "%T"], capture_output=True, text=True).stdout, 60)
    try:
        plan = plan_two_copies(work / "p2.yaml", "node1", "node2") if no_room else \
            plan_one_copy(work / "p1.yaml", "node1", "node2")
        run.up(plan, "--time", "3:00", "--cutover-margin", "20", "--drain-grace", "30")
        run.start_load()
        run.mark_event()
        time.sleep(drive_s)
        records = run.stop_load()
        evs = events(run.state, run.name)
        took = [e["data"].get("took_s") for e in evs if e["kind"] == "cutover-done"]
        return run.row(records, drive_s=drive_s, cutovers=len(took), cutover_s=took,
                       events=_kinds(evs, "cutover-start", "drain", "drained", "cutover-done", "cutover-rollback",
                                     "resubmit", "no-room"),
                       no_room_said=any("no room for both" in e["detail"] for e in evs if e["kind"] == "cutover-start"))
    finally:
        if blocker:
            subprocess.run(["scancel", blocker], capture_output=True)


def _an_engine(doc: dict[str, Any], llm: str) -> dict[str, Any]:
    return next(i for i in doc["instances"] if i["llm"] == llm and i["routed"])


def sc_engine_crash(run: Run, work: Path) -> dict[str, Any]:
    doc = run.up(plan_one_copy(work / "p.yaml", "node1", "node2"))
    run.start_load()
    time.sleep(15)
    victim = _an_engine(doc, "rewriter")
    run.mark_event()
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for("the engine restarted", lambda: any(i["restarts"] > 0 for i in status(run.state, run.name)["instances"]
                                                  if i["llm"] == "rewriter"), 60)
    run.recovered(60)
    time.sleep(10)
    records = run.stop_load()
    later = [r for r in records if r.t_send > run.t_recovered]
    after = status(run.state, run.name)
    inst = next(i for i in after["instances"] if i["llm"] == "rewriter")
    return run.row(records, failed_after_recovery=sum(1 for r in later if not r.ok),
                   in_flight_at_kill=sum(1 for r in records if r.model == "rewriter" and r.t_send < run.t_event < r.t_end),
                   restarts=inst["restarts"])


def sc_wedged(run: Run, work: Path) -> dict[str, Any]:
    import urllib.request

    doc = run.up(plan_one_copy(work / "p.yaml", "node1", "node2"), "--stall-timeout", "10")
    run.start_load()
    time.sleep(15)
    victim = _an_engine(doc, "reranker")
    # straight to the engine, so with its job's engine secret (from the job's serve.json)
    job = next(j for j in doc["jobs"] if j["job_id"] == victim["job_id"])
    serve = json.loads((run.state / "deployments" / run.name / "jobs" / job["name"] / "serve.json").read_text())
    req = urllib.request.Request(f"{victim['url']}/scepsy/sim/fault", data=b'{"wedge": true}', method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {serve['engine_secret']}"})
    run.mark_event()
    urllib.request.urlopen(req, timeout=10).read()
    detect = wait_for("the wedged engine restarted", lambda: any(
        i["restarts"] > 0 for i in status(run.state, run.name)["instances"] if i["llm"] == "reranker"), 120)
    run.recovered(60)
    time.sleep(10)
    records = run.stop_load()
    evs = events(run.state, run.name)
    return run.row(records, detected_s=round(detect, 2), stall_timeout_s=10,
                   restart_said=any(e["kind"] == "engine-restart" for e in evs))


def sc_lost_node(run: Run, work: Path) -> dict[str, Any]:
    doc = run.up(plan_one_copy(work / "p.yaml", "node1", "node2"))
    run.start_load()
    time.sleep(15)
    node = "node2"
    old = {j["job_id"] for j in doc["jobs"] if j["nodes"] == node}
    run.mark_event()
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=bench_continuity"], check=True)
    try:
        wait_for("the daemon saw the node's job end", lambda: not old & {
            j["job_id"] for j in status(run.state, run.name)["jobs"] if j["ended"] is None}, 120)
        rec = run.recovered(180)
        time.sleep(10)
    finally:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
    records = run.stop_load()
    after = status(run.state, run.name)
    evs = events(run.state, run.name)
    now_on = sorted({j["nodes"] for j in after["jobs"] if j["ended"] is None and j["role"] != "abandoned"})
    queue = after["continuity"]["queue_wait_s"]
    time.sleep(5)   # a job Slurm requeued off the down node must be gone for good, not back once the node resumes
    live = {j["job_id"] for j in status(run.state, run.name)["jobs"] if j["ended"] is None}
    queued = subprocess.run(["squeue", "--me", "-h", "-o", "%i|%j"], capture_output=True, text=True).stdout.split()
    orphans = sorted(line.split("|")[0] for line in queued if f"scepsy-{run.name}-" in line
                     and line.split("|")[0] not in live)
    return run.row(records, node=node, old_jobs=sorted(old), nodes_after=now_on, orphans=orphans,
                   excluded=list(after["continuity"]["excluded_nodes"]), queue_wait_s=queue,
                   within_60s_plus_queue=rec <= 60 + queue,
                   events=_kinds(evs, "node-excluded", "resubmit", "job"))


def sc_scancel(run: Run, work: Path) -> dict[str, Any]:
    run.up(plan_one_copy(work / "p.yaml", "node1", "node2"), "--max-resubmits", "2", "--resubmit-window", "600")
    run.start_load()
    time.sleep(10)
    recoveries = []
    for k in range(3):
        doc = status(run.state, run.name)
        victim = next(j for j in doc["jobs"] if j["ended"] is None and j["nodes"] == "node2")
        if k == 0:
            run.mark_event()
        t0 = time.monotonic()
        subprocess.run(["scancel", victim["job_id"]], check=True)
        if k < 2:
            wait_for("resubmitted and serving", lambda: full(status(run.state, run.name)) and victim["job_id"] not in
                     {j["job_id"] for j in status(run.state, run.name)["jobs"] if j["ended"] is None}, 180)
            recoveries.append(round(time.monotonic() - t0, 2))
            if k == 0:
                run.t_recovered = run.now()
    failed_at = wait_for("failed by the breaker", lambda: status(run.state, run.name)["state"] == "failed", 120)
    records = run.stop_load()
    after = status(run.state, run.name)
    evs = events(run.state, run.name)
    before_breaker = [r for r in records if r.t_send < run.now() - failed_at - 5]
    from scepsy_hpc.drive.steady import summary

    return run.row(records, recoveries_s=recoveries, breaker_error=after["error"],
                   failed_before_breaker=summary(before_breaker)["failed"],
                   events=_kinds(evs, "resubmit", "breaker-open"))


def sc_daemon_kill(run: Run, work: Path) -> dict[str, Any]:
    doc = run.up(plan_one_copy(work / "p.yaml", "node1", "node2"), "--time", "2:00", "--cutover-margin", "20",
                 "--drain-grace", "30")
    first = {j["job_id"] for j in doc["jobs"]}
    run.start_load()
    wait_for("a cut-over started", lambda: any(e["kind"] == "cutover-start" for e in events(run.state, run.name)), 150)
    pid = json.loads(scepsy(run.state, "daemon", "status", "--json").stdout)["pid"]
    run.mark_event()
    os.kill(pid, signal.SIGKILL)
    time.sleep(3)
    scepsy(run.state, "daemon", "start", "--poll", "1")

    def completed() -> bool:
        d = status(run.state, run.name)
        live = {j["job_id"] for j in d["jobs"] if j["ended"] is None}
        return full(d) and not live & first and len(live) == 2

    wait_for("the cut-over completed by the next daemon", completed, 150)
    run.t_recovered = run.now()
    time.sleep(5)
    records = run.stop_load()
    after = status(run.state, run.name)
    live = sorted(j["job_id"] for j in after["jobs"] if j["ended"] is None)
    queued = subprocess.run(["squeue", "--me", "-h", "-o", "%i|%j"], capture_output=True, text=True).stdout.split()
    ours = sorted(line.split("|")[0] for line in queued if f"scepsy-{run.name}-" in line)
    return run.row(records, live_jobs=live, jobs_in_squeue=ours, duplicates=len(live) - 2,
                   orphans=sorted(set(ours) - set(live)))


def diagnostics(run: Run) -> dict[str, Any]:
    """What a failed scenario leaves to read: the deployment's status (instances, state message) and the tails of
    the daemon's and the gateway's logs (CI keeps no state dir)."""
    out: dict[str, Any] = {}
    try:
        doc = status(run.state, run.name)
        out["status"] = {k: doc.get(k) for k in ("state", "message", "base_url", "instances", "continuity")}
    except Exception as exc:   # a diagnostic that fails says so instead
        out["status"] = f"unavailable: {exc}"
    for what, path in (("daemon_log_tail", run.state / "daemon.log"),
                       ("gateway_log_tail", run.state / "gateway" / "gateway.log")):
        try:
            out[what] = path.read_text(errors="replace")[-4000:]
        except OSError as exc:
            out[what] = f"unreadable: {exc}"
    return out


def run_scenario(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    run = Run(work, name, args.rps)
    t0 = time.monotonic()
    try:
        if name == "walltime":
            row = sc_walltime(run, work / name, args.drive_s)
        elif name == "no-room":
            row = sc_walltime(run, work / name, args.drive_s, no_room=True)
        elif name == "engine-crash":
            row = sc_engine_crash(run, work / name)
        elif name == "wedged":
            row = sc_wedged(run, work / name)
        elif name == "lost-node":
            row = sc_lost_node(run, work / name)
        elif name == "scancel":
            row = sc_scancel(run, work / name)
        else:
            row = sc_daemon_kill(run, work / name)
    except Failed as exc:
        if run.load is not None:
            try:
                run.stop_load()
            except Exception:   # the row says what failed; the load's end does not matter then
                pass
        tail = scepsy(run.state, "events", name, check=False).stdout[-3000:]
        row = {"scenario": name, "error": str(exc), "events_tail": tail, **diagnostics(run)}
    finally:
        run.close()
    row["wall_s"] = round(time.monotonic() - t0, 1)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", action="append", choices=SCENARIOS, help="run only these (repeatable)")
    ap.add_argument("--drive-s", type=float, default=420.0, help="how long walltime and no-room are driven (default 420)")
    ap.add_argument("--rps", type=float, default=5.0, help="calls per second of the steady load (default 5)")
    ap.add_argument("--keep", action="store_true", help="keep the state dirs (printed)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    problem = slurm_problem()
    if problem:
        print(f"bench_continuity: no Slurm cluster ({problem}); start one with `sudo scripts/slurm-local.sh start`",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="scepsy-continuity-"))
    os.chmod(work, 0o700)
    rows = [run_scenario(s, work, args) for s in (args.scenario or SCENARIOS)]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "rps": args.rps, "time_scale": TIME_SCALE,
           "scenarios": rows, **({"work": str(work)} if args.keep else {})}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{'scenario':13} {'sent':>6} {'failed':>6} {'p99 before':>10} {'p99 during':>10} {'recovery_s':>10}  notes")
        for r in rows:
            if "error" in r:
                print(f"{r['scenario']:13} ERROR {r['error']}")
                continue
            notes = {k: v for k, v in r.items() if k not in ("scenario", "sent", "failed", "p99_before_s",
                                                              "p99_during_s", "recovery_s")}
            fmt = lambda v: "-" if v is None else f"{v:.3f}"   # noqa: E731
            print(f"{r['scenario']:13} {r['sent']:>6} {r['failed']:>6} {fmt(r['p99_before_s']):>10} "
                  f"{fmt(r['p99_during_s']):>10} {fmt(r['recovery_s']):>10}  {json.dumps(notes)}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
