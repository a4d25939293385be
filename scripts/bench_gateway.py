#!/usr/bin/env python3
"""Gateway overhead: the same small calls straight to a sim engine and through the gateway, interleaved.

    .venv/bin/python scripts/bench_gateway.py [-n 400] [--concurrency 8] [--inproc] [--json out.json]

One simulated engine (a tiny model at time scale 0.001, so the engine's modelled GPU time is
microseconds and latency is mostly HTTP) and one gateway (a subprocess by default, tracing to a
temporary file, its LLM name rewritten to the served model: the gateway's full path). Each scenario
sends pairs of identical calls, one direct and one through the gateway, in random order, so both
paths see the same engine state; the figure is the gateway's added median latency.

Scenarios: unary sequential, unary at --concurrency (each worker sends pairs), streaming sequential
(total latency and time to first token). Calls are /v1/completions with a prompt of 32 token ids
and max_tokens 8. The client (aiohttp, one pooled session) is the same for both paths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from scepsy_hpc.engine.local import SimEngineSpec, free_port, sim_engines  # noqa: E402
from scepsy_hpc.engine import supervisor  # noqa: E402

LLM = "bench"


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _unary(session: aiohttp.ClientSession, base: str, model: str, body: dict[str, Any]) -> tuple[float, float | None]:
    t0 = time.perf_counter()
    async with session.post(base + "/v1/completions", json={**body, "model": model}) as r:
        data = await r.read()
        if r.status != 200:
            raise RuntimeError(f"{base}: HTTP {r.status}: {data[:300]!r}")
    return time.perf_counter() - t0, None


async def _stream(session: aiohttp.ClientSession, base: str, model: str, body: dict[str, Any]) -> tuple[float, float | None]:
    t0 = time.perf_counter()
    ttft = None
    async with session.post(base + "/v1/completions", json={**body, "model": model, "stream": True}) as r:
        if r.status != 200:
            raise RuntimeError(f"{base}: HTTP {r.status}: {(await r.read())[:300]!r}")
        async for line in r.content:
            if ttft is None and line.startswith(b"data: {") and b'"text"' in line:
                ttft = time.perf_counter() - t0
    return time.perf_counter() - t0, ttft


Call = Callable[[aiohttp.ClientSession, str, str, dict[str, Any]], Awaitable[tuple[float, float | None]]]


async def _pairs(session: aiohttp.ClientSession, paths: dict[str, tuple[str, str]], call: Call, body: dict[str, Any],
                 n: int, concurrency: int, rng: random.Random) -> dict[str, list[tuple[float, float | None]]]:
    """`n` calls per path, sent as pairs in random order by `concurrency` workers."""
    out: dict[str, list[tuple[float, float | None]]] = {k: [] for k in paths}
    orders = [rng.sample(list(paths), len(paths)) for _ in range(n)]
    it = iter(orders)

    async def worker() -> None:
        for order in it:
            for name in order:
                base, model = paths[name]
                out[name].append(await call(session, base, model, body))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(args: argparse.Namespace, engine_url: str, gateway_url: str, served: str) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    body = {"prompt": list(range(1, args.prompt_tokens + 1)), "max_tokens": args.max_tokens}
    paths = {"direct": (engine_url, served), "gateway": (gateway_url, LLM)}
    rows: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        await _pairs(session, paths, _unary, body, 30, 1, rng)  # warm-up: connections, caches
        await _pairs(session, paths, _stream, body, 10, 1, rng)
        scenarios = [("unary seq", _unary, 1), (f"unary c={args.concurrency}", _unary, args.concurrency),
                     ("stream seq", _stream, 1)]
        for label, call, conc in scenarios:
            res = await _pairs(session, paths, call, body, args.n, conc, rng)
            for metric, idx in (("latency", 0), ("ttft", 1)):
                if call is _unary and metric == "ttft":
                    continue
                row: dict[str, Any] = {"scenario": label, "metric": metric}
                for name in paths:
                    xs = [r[idx] * 1e3 for r in res[name] if r[idx] is not None]
                    row[name] = {"n": len(xs), "median_ms": statistics.median(xs), "p90_ms": _pct(xs, 0.9)}
                row["added_median_ms"] = row["gateway"]["median_ms"] - row["direct"]["median_ms"]
                row["added_p90_ms"] = row["gateway"]["p90_ms"] - row["direct"]["p90_ms"]
                rows.append(row)
    return rows


async def _inproc(args: argparse.Namespace, engine_url: str, served: str, ep: Path, trace: Path) -> list[dict[str, Any]]:
    from scepsy_hpc.gateway import start_gateway

    gw = await start_gateway(ep, None if args.no_trace else trace, time_scale=args.time_scale)
    try:
        return await _measure(args, engine_url, gw.url, served)
    finally:
        await gw.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=400, help="calls per path and scenario (default 400)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--model", default="llama-3.2-1b-instruct")
    p.add_argument("--gpu", default="h100-sxm")
    p.add_argument("--time-scale", type=float, default=0.001)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--inproc", action="store_true", help="run the gateway in this process (shares the client's loop)")
    p.add_argument("--no-trace", action="store_true", help="run the gateway without a trace file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON ('-' for stdout)")
    args = p.parse_args()

    cpu0 = cpu1 = (0.0, 0.0)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp_s:
        tmp = Path(tmp_s)
        with sim_engines([SimEngineSpec(args.model, args.gpu)], args.time_scale, tmp / "logs") as engines:
            eng = engines[0]
            served = eng.spec.served_name
            ep = tmp / "endpoints.yaml"
            ep.write_text(f"time_scale: {args.time_scale}\nllms:\n  {LLM}:\n    served_model: {served}\n"
                          f"    replicas: [{eng.url}]\n")
            trace = tmp / "trace.jsonl"
            if args.inproc:
                rows = asyncio.run(_inproc(args, eng.url, served, ep, trace))
                mode = "in-process"
            else:
                port = free_port()
                env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
                cmd = [sys.executable, "-m", "scepsy_hpc.gateway", "--endpoints", str(ep), "--port", str(port)]
                cmd += [] if args.no_trace else ["--trace", str(trace)]
                url = f"http://127.0.0.1:{port}"
                proc = supervisor.start(cmd, tmp / "logs" / "gateway.log", what="gateway", health=url, env=env)
                try:
                    supervisor.wait_healthy([proc], timeout_s=20.0)
                    cpu0 = _cpu_s(proc.pid), _cpu_s(eng.process.pid)
                    rows = asyncio.run(_measure(args, eng.url, url, served))
                    cpu1 = _cpu_s(proc.pid), _cpu_s(eng.process.pid)
                    mode = "subprocess"
                finally:
                    proc.stop()
            traced = sum(1 for line in trace.read_text().splitlines() if '"kind":"call"' in line) if trace.exists() else 0

    print(f"gateway overhead: {args.model} sim engine at time scale {args.time_scale}, gateway {mode}, "
          f"{args.prompt_tokens}-token prompts, max_tokens {args.max_tokens}, n={args.n} per path; "
          f"{traced} calls traced; {os.cpu_count()} CPUs")
    head = f"{'scenario':<14} {'metric':<8} {'direct med':>10} {'p90':>8} {'gateway med':>11} {'p90':>8} {'added med':>10} {'added p90':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        d, g = r["direct"], r["gateway"]
        print(f"{r['scenario']:<14} {r['metric']:<8} {d['median_ms']:>8.2f}ms {d['p90_ms']:>6.2f}ms "
              f"{g['median_ms']:>9.2f}ms {g['p90_ms']:>6.2f}ms {r['added_median_ms']:>+8.2f}ms {r['added_p90_ms']:>+8.2f}ms")
    n_gw = 40 + 3 * args.n  # warm-up included: the CPU counters cover every call through the gateway
    cpu = {"gateway_cpu_ms_per_call": (cpu1[0] - cpu0[0]) * 1e3 / n_gw,
           "engine_cpu_ms_per_call": (cpu1[1] - cpu0[1]) * 1e3 / (2 * n_gw)}
    if mode == "subprocess":
        print(f"CPU per call: gateway {cpu['gateway_cpu_ms_per_call']:.2f} ms, engine {cpu['engine_cpu_ms_per_call']:.2f} ms "
              f"(/proc, {os.sysconf('SC_CLK_TCK')} Hz ticks)")
    if args.json:
        doc = json.dumps({"mode": mode, "time_scale": args.time_scale, "n": args.n, "cpus": os.cpu_count(), "rows": rows,
                          **(cpu if mode == "subprocess" else {})},
                         indent=2)
        if args.json == "-":
            print(doc)
        else:
            Path(args.json).write_text(doc + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
