#!/usr/bin/env python3
"""What `scepsy tunnel` adds: the same short calls to one gateway directly and through the tunnel, in one run.

    .venv/bin/python scripts/bench_tunnel.py [-n 300] [--concurrency 16] [--tput-calls 3000] [--json FILE|-]

The login node is this machine, reached over OpenSSH's sshd on loopback (scripts/sshd-local.sh: started
here when not running, and stopped again at the end; Host scepsy-login). A daemon on a temporary state
dir serves a small deployment on the local backend (rag_rerank's three LLMs as simulated engines at time
scale 0.001, so an engine answers in well under a millisecond of modelled time and latency is HTTP and
forwarding), and `scepsy --remote scepsy-login tunnel bench` runs as a subprocess, as a user runs it: one
SSH connection, a direct-tcpip channel per local TCP connection. Every call is a chat completion to
`generator` with the deployment's owner key.

Latency, sequential: pairs of identical calls, one direct and one through the tunnel, in random order, so
both paths see the same gateway and engine state: unary on a kept-alive connection (the steady state of an
SDK's pool), unary on a new connection per call (the channel opened each time), and streamed (total, and
the first event of the stream). The figure is the tunnel's added median and p90.

Throughput: --concurrency keep-alive connections per path send unary calls as fast as answers come back
(closed loop), in alternating rounds (direct, tunnel, tunnel, direct, ...) so both see the same machine;
calls/s per path, its latency under that load, and the CPU per call of the tunnel process and of the sshd
serving its connection (/proc). The client is a minimal asyncio HTTP/1.1 writer of one pre-built request,
so the ceiling measured is the servers' and the tunnel's, not the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "sshd-local.sh"
SCEPSY = [sys.executable, "-m", "scepsy_hpc.cli"]
NAME = "bench"
MODEL = "generator"
PLAN = {"workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 5},
        "allocation": {"generator": {"tp": 4}, "rewriter": {"gpu_frac": 0.5}, "reranker": {"gpu_frac": 0.5}},
        "placement": [{"llm": "generator", "replica": 0, "node": "node1", "gpus": [0, 1, 2, 3]},
                      {"llm": "rewriter", "replica": 0, "node": "node2", "gpus": [0]},
                      {"llm": "reranker", "replica": 0, "node": "node2", "gpus": [0]}]}


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _ms(xs: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(xs) * 1e3, "p90_ms": _pct(xs, 0.9) * 1e3, "n": len(xs)}


# --- a minimal HTTP/1.1 client ------------------------------------------------------------------------------


def _request(port: int, key: str, max_tokens: int, stream: bool) -> bytes:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello there"}],
                       "max_tokens": max_tokens, "stream": stream}).encode()
    return (f"POST /d/{NAME}/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


class Conn:
    """One keep-alive HTTP/1.1 connection; `call` sends a request and reads the whole answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> "Conn":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def call(self, request: bytes) -> tuple[float, float]:
        """(seconds to the whole answer, seconds to the first byte of its body)."""
        assert self.reader is not None and self.writer is not None
        r = self.reader
        t0 = time.perf_counter()
        self.writer.write(request)
        head = await r.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
        first = None
        if b"content-length" in headers:
            body = await r.readexactly(int(headers[b"content-length"]))
            first = time.perf_counter()
        else:   # chunked: the event stream of a streamed call
            body = b""
            while True:
                size = int((await r.readline()).split(b";")[0], 16)
                first = first or time.perf_counter()
                if size == 0:
                    await r.readline()
                    break
                body += (await r.readexactly(size + 2))[:-2]
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()} from port {self.port}: {body[:300]!r}")
        return time.perf_counter() - t0, first - t0

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass


async def _fresh_call(port: int, request: bytes) -> tuple[float, float]:
    """A call on a new connection (connecting counted), closed after."""
    t0 = time.perf_counter()
    c = await Conn(port).open()
    try:
        total, first = await c.call(request)
    finally:
        await c.close()
    dt = time.perf_counter() - t0
    return dt, first + dt - total


async def _latency(args: argparse.Namespace, ports: dict[str, int], key: str) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    unary = {p: _request(port, key, args.max_tokens, False) for p, port in ports.items()}
    stream = {p: _request(port, key, args.max_tokens, True) for p, port in ports.items()}
    kept = {p: await Conn(port).open() for p, port in ports.items()}
    try:
        scenarios: list[tuple[str, Callable[[str], Awaitable[tuple[float, float]]]]] = [
            ("keep-alive", lambda p: kept[p].call(unary[p])),
            ("new connection", lambda p: _fresh_call(ports[p], unary[p])),
            ("stream", lambda p: kept[p].call(stream[p])),
        ]
        for _ in range(20):   # warm-up: both paths, every kind
            for _, call in scenarios:
                for p in ports:
                    await call(p)
        rows = []
        for scenario, call in scenarios:
            got: dict[str, list[tuple[float, float]]] = {p: [] for p in ports}
            for _ in range(args.n):
                order = list(ports)
                rng.shuffle(order)
                for p in order:
                    got[p].append(await call(p))
            metrics = [("total", 0)] + ([("1st event", 1)] if scenario == "stream" else [])
            for metric, i in metrics:
                d, t = _ms([x[i] for x in got["direct"]]), _ms([x[i] for x in got["tunnel"]])
                rows.append({"scenario": scenario, "metric": metric, "direct": d, "tunnel": t,
                             "added_median_ms": t["median_ms"] - d["median_ms"], "added_p90_ms": t["p90_ms"] - d["p90_ms"],
                             "ratio_median": t["median_ms"] / d["median_ms"]})
        return rows
    finally:
        for c in kept.values():
            await c.close()


async def _closed_loop(port: int, request: bytes, calls: int, concurrency: int) -> tuple[float, list[float]]:
    conns = [await Conn(port).open() for _ in range(concurrency)]
    left = [calls]
    lat: list[float] = []

    async def worker(c: Conn) -> None:
        while left[0] > 0:
            left[0] -= 1
            lat.append((await c.call(request))[0])

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        elapsed = time.perf_counter() - t0
        for c in conns:
            await c.close()
    return elapsed, lat


def _cpu_s(pids: list[int]) -> float:
    """utime + stime of these processes (those gone count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _below(root: int) -> list[int]:
    """The processes under `root` (not itself): the per-connection sshds under the login server's listener."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [root]
    while frontier:
        up = frontier.pop()
        kids = [p for p, pp in parent.items() if pp == up]
        found += kids
        frontier += kids
    return found


async def _throughput(args: argparse.Namespace, ports: dict[str, int], key: str, pids: dict[str, Any]) -> dict[str, Any]:
    req = {p: _request(port, key, args.tput_max_tokens, False) for p, port in ports.items()}
    per_round = max(1, args.tput_calls // args.tput_rounds)
    res: dict[str, Any] = {p: {"round_calls_per_s": [], "lat": [], "elapsed_s": 0.0, "calls": 0} for p in ports}
    cpu = {"tunnel": 0.0, "sshd": 0.0}
    await _closed_loop(ports["direct"], req["direct"], 200, args.concurrency)   # warm-up
    await _closed_loop(ports["tunnel"], req["tunnel"], 200, args.concurrency)
    order = ["direct", "tunnel"]
    for r in range(args.tput_rounds):
        for p in (order if r % 2 == 0 else order[::-1]):
            sshd = _below(pids["login_listener"])
            c0 = _cpu_s([pids["tunnel"]]), _cpu_s(sshd)
            elapsed, lat = await _closed_loop(ports[p], req[p], per_round, args.concurrency)
            if p == "tunnel":
                cpu["tunnel"] += _cpu_s([pids["tunnel"]]) - c0[0]
                cpu["sshd"] += _cpu_s(sshd) - c0[1]
            x = res[p]
            x["round_calls_per_s"].append(round(per_round / elapsed))
            x["lat"] += lat
            x["elapsed_s"] += elapsed
            x["calls"] += per_round
    out: dict[str, Any] = {"concurrency": args.concurrency, "rounds": args.tput_rounds, "calls_per_round": per_round,
                           "max_tokens": args.tput_max_tokens}
    for p in ports:
        x = res[p]
        out[p] = {"calls_per_s": x["calls"] / x["elapsed_s"], "p50_ms": _pct(x["lat"], 0.5) * 1e3,
                  "p90_ms": _pct(x["lat"], 0.9) * 1e3, "round_calls_per_s": x["round_calls_per_s"]}
    calls = res["tunnel"]["calls"]
    out["tunnel_cpu_ms_per_call"] = cpu["tunnel"] * 1e3 / calls
    out["sshd_cpu_ms_per_call"] = cpu["sshd"] * 1e3 / calls
    out["ratio"] = out["tunnel"]["calls_per_s"] / out["direct"]["calls_per_s"]
    return out


# --- the servers --------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def _scepsy(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*SCEPSY, *args, "--state-dir", str(state)], capture_output=True, text=True, timeout=300,
                          env=_env())
    if done.returncode != 0:
        raise SystemExit(f"bench_tunnel: scepsy {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done


def _sshd_up() -> tuple[dict[str, str], bool]:
    """The sshd-local environment (SCEPSY_SSH_CONFIG, ...); whether this run started the servers."""
    up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60).returncode == 0
    if not up:
        done = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f"bench_tunnel: scripts/sshd-local.sh start failed:\n{done.stdout}{done.stderr}")
    out = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, timeout=60, check=True).stdout
    env = {}
    for line in out.splitlines():
        k, _, v = line.removeprefix("export ").partition("=")
        env[k] = shlex.split(v)[0] if v else ""
    return env, not up


def _serve(state: Path, time_scale: float) -> dict[str, Any]:
    import yaml

    plan = state.parent / "plan.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    _scepsy(state, "daemon", "start", "--poll", "1")
    _scepsy(state, "up", str(plan), "--name", NAME, "--detach", "--time-scale", str(time_scale))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        doc = json.loads(subprocess.run([*SCEPSY, "status", NAME, "--json", "--state-dir", str(state)],
                                        capture_output=True, text=True, timeout=60, env=_env()).stdout)
        if doc.get("state") == "serving":
            return dict(doc)
        time.sleep(0.3)
    raise SystemExit(f"bench_tunnel: deployment {NAME} never served: {doc}")


def _open_tunnel(state: Path, ssh_env: dict[str, str]) -> tuple[subprocess.Popen[str], dict[str, Any], list[str]]:
    remote = (f"env SCEPSY_STATE_DIR={shlex.quote(str(state))} PYTHONPATH={shlex.quote(str(ROOT))} "
              f"{shlex.quote(sys.executable)} -m scepsy_hpc.cli")
    argv = [*SCEPSY, "--remote", "scepsy-login", "--remote-scepsy", remote, "tunnel", NAME, "--json"]
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env={**_env(), **ssh_env})
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], 60)[0] or not (line := proc.stdout.readline()):
        proc.kill()
        err.seek(0)
        raise SystemExit(f"bench_tunnel: the tunnel did not start:\n{err.read()}")
    return proc, json.loads(line), ["scepsy", *argv[3:5], "--remote-scepsy", "'env SCEPSY_STATE_DIR=… python -m "
                                    "scepsy_hpc.cli'", *argv[7:]]


# --- output -------------------------------------------------------------------------------------------------


def _print(doc: dict[str, Any]) -> None:
    print(f"command: {doc['command']}")
    print(f"tunnel:  {doc['tunnel_command']}")
    print(f"tunnel overhead: deployment {NAME} (rag_rerank, sim engines at time scale {doc['time_scale']}), chat "
          f"completions to {MODEL}, max_tokens {doc['max_tokens']}, n={doc['n']} per path and scenario; sshd-local "
          f"{'started by this run' if doc['sshd_started'] else 'already running'}; {doc['cpus']} CPUs")
    head = (f"{'scenario':<15} {'metric':<9} {'direct med':>10} {'p90':>8} {'tunnel med':>10} {'p90':>8} "
            f"{'added med':>10} {'added p90':>10} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for r in doc["rows"]:
        d, t = r["direct"], r["tunnel"]
        print(f"{r['scenario']:<15} {r['metric']:<9} {d['median_ms']:>8.2f}ms {d['p90_ms']:>6.2f}ms "
              f"{t['median_ms']:>8.2f}ms {t['p90_ms']:>6.2f}ms {r['added_median_ms']:>+8.2f}ms "
              f"{r['added_p90_ms']:>+8.2f}ms {r['ratio_median']:>5.2f}x")
    t = doc.get("throughput")
    if t:
        print(f"\nthroughput: unary, max_tokens {t['max_tokens']}, {t['concurrency']} concurrent keep-alive "
              f"connections per path, {t['rounds']} alternating rounds of {t['calls_per_round']} calls")
        head = f"{'path':<8} {'calls/s':>8} {'p50':>8} {'p90':>8}  rounds (calls/s)"
        print(head)
        print("-" * len(head))
        for p in ("direct", "tunnel"):
            x = t[p]
            print(f"{p:<8} {x['calls_per_s']:>8.0f} {x['p50_ms']:>6.2f}ms {x['p90_ms']:>6.2f}ms  "
                  f"{' '.join(str(v) for v in x['round_calls_per_s'])}")
        print(f"tunnel / direct: {t['ratio']:.0%} of direct calls/s; added p50 "
              f"{t['tunnel']['p50_ms'] - t['direct']['p50_ms']:+.2f} ms; CPU per call through the tunnel: the tunnel "
              f"process {t['tunnel_cpu_ms_per_call']:.3f} ms, sshd {t['sshd_cpu_ms_per_call']:.3f} ms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=300, help="calls per path and latency scenario (default 300)")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--time-scale", type=float, default=0.001, help="the sim engines' time scale (default 0.001)")
    p.add_argument("--concurrency", type=int, default=16, help="throughput: connections per path (default 16)")
    p.add_argument("--tput-calls", type=int, default=3000, help="throughput: calls per path (default 3000; 0 skips)")
    p.add_argument("--tput-rounds", type=int, default=6, help="throughput: rounds per path, alternating (default 6)")
    p.add_argument("--tput-max-tokens", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON ('-': on stdout, instead of the table)")
    args = p.parse_args()

    command = "scripts/bench_tunnel.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    ssh_env, started = _sshd_up()
    tunnel: subprocess.Popen[str] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-tunnel-") as tmp:
        state = Path(tmp) / "state"
        try:
            status = _serve(state, args.time_scale)
            key = (state / "deployments" / NAME / "owner.key").read_text().strip()
            tunnel, ready, tunnel_argv = _open_tunnel(state, ssh_env)
            ports = {"direct": int(status["gateway_url"].rsplit(":", 1)[1]), "tunnel": int(ready["local_port"])}
            listener = int((Path(ssh_env["SCEPSY_SSHD_DIR"]) / "login" / "sshd.pid").read_text())
            doc: dict[str, Any] = {"command": command, "tunnel_command": " ".join(tunnel_argv),
                                   "time_scale": args.time_scale, "max_tokens": args.max_tokens, "n": args.n,
                                   "cpus": os.cpu_count(), "sshd_started": started,
                                   "rows": asyncio.run(_latency(args, ports, key))}
            if args.tput_calls > 0:
                doc["throughput"] = asyncio.run(_throughput(args, ports, key,
                                                            {"tunnel": tunnel.pid, "login_listener": listener}))
        finally:
            if tunnel is not None:
                tunnel.send_signal(signal.SIGINT)
                tunnel.wait(30)
            if (state / "daemon.lock").exists():
                subprocess.run([*SCEPSY, "daemon", "stop", "--all", "--timeout", "60", "--state-dir", str(state)],
                               capture_output=True, timeout=120, env=_env())
            if started:
                subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=60)
    if args.json != "-":
        _print(doc)
    if args.json:
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
