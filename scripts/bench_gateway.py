#!/usr/bin/env python3
"""Gateway overhead: the same small calls straight to a sim engine and through the gateway, interleaved.

    .venv/bin/python scripts/bench_gateway.py [-n 400] [--concurrency 8] [--tput-n 6000] [--inproc] [--json out.json]

One simulated engine (a tiny model at time scale 0.001, so the engine's modelled GPU time is
microseconds and latency is mostly HTTP) and one gateway (a subprocess by default, tracing to a
temporary file, its LLM name rewritten to the served model: the gateway's full path). Each scenario
sends pairs of identical calls, one direct and one through the gateway, in random order, so both
paths see the same engine state; the figure is the gateway's added median latency.

Scenarios: unary sequential, unary at --concurrency (each worker sends pairs), streaming sequential
(total latency and time to first token). Calls are /v1/completions with a prompt of 32 token ids
and max_tokens 8. The client (aiohttp, one pooled session) is the same for both paths.

The gateway runs as deployed: its endpoints file has an `auth` section (one client key whose
max_concurrent and rpm are far above what the run sends, so they are checked but never bind) and
the replica's `api_key`; the engine is started with that secret (`SCEPSY_ENGINE_API_KEY`). Direct
calls carry the engine's secret, gateway calls the client key.

Throughput (`--tput-n` calls per path, 0 skips it): unary calls with max_tokens 1 sent as fast as
--tput-concurrency (16) keep-alive connections allow, in alternating rounds (direct, gateway,
gateway, direct, ...) so both paths see the same machine. Its client is a minimal HTTP/1.1 writer
of one pre-built request per connection, far cheaper than the server side, so the ceiling measured
is the servers'; its own CPU is printed with the gateway's and the engine's (per call, from /proc),
which explains the ratio on a machine where client, gateway and engine share the cores.
"""

from __future__ import annotations

import argparse
import hashlib
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
# A client key in the daemon's format (sk-scepsy-<id>-<token>) and the engine's secret; fixed, as
# this is a benchmark on loopback.
KEY_ID = "b3e7c0de"
CLIENT_KEY = f"sk-scepsy-{KEY_ID}-" + "k" * 43
ENGINE_SECRET = "bench-engine-secret"


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


Path_ = tuple[str, str, dict[str, str]]  # base URL, model name, headers


async def _unary(session: aiohttp.ClientSession, path: Path_, body: dict[str, Any]) -> tuple[float, float | None]:
    base, model, headers = path
    t0 = time.perf_counter()
    async with session.post(base + "/v1/completions", json={**body, "model": model}, headers=headers) as r:
        data = await r.read()
        if r.status != 200:
            raise RuntimeError(f"{base}: HTTP {r.status}: {data[:300]!r}")
    return time.perf_counter() - t0, None


async def _stream(session: aiohttp.ClientSession, path: Path_, body: dict[str, Any]) -> tuple[float, float | None]:
    base, model, headers = path
    t0 = time.perf_counter()
    ttft = None
    async with session.post(base + "/v1/completions", json={**body, "model": model, "stream": True},
                            headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"{base}: HTTP {r.status}: {(await r.read())[:300]!r}")
        async for line in r.content:
            if ttft is None and line.startswith(b"data: {") and b'"text"' in line:
                ttft = time.perf_counter() - t0
    return time.perf_counter() - t0, ttft


Call = Callable[[aiohttp.ClientSession, Path_, dict[str, Any]], Awaitable[tuple[float, float | None]]]


async def _pairs(session: aiohttp.ClientSession, paths: dict[str, Path_], call: Call, body: dict[str, Any],
                 n: int, concurrency: int, rng: random.Random) -> dict[str, list[tuple[float, float | None]]]:
    """`n` calls per path, sent as pairs in random order by `concurrency` workers."""
    out: dict[str, list[tuple[float, float | None]]] = {k: [] for k in paths}
    orders = [rng.sample(list(paths), len(paths)) for _ in range(n)]
    it = iter(orders)

    async def worker() -> None:
        for order in it:
            for name in order:
                out[name].append(await call(session, paths[name], body))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _latency(args: argparse.Namespace, paths: dict[str, Path_], rng: random.Random) -> list[dict[str, Any]]:
    """The latency scenarios: pairs of identical calls through one pooled aiohttp session."""
    body = {"prompt": list(range(1, args.prompt_tokens + 1)), "max_tokens": args.max_tokens}
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


# -- throughput ------------------------------------------------------------------------------------

def _raw_request(base: str, model: str, headers: dict[str, str], max_tokens: int, prompt_tokens: int) -> bytes:
    """One complete HTTP/1.1 POST /v1/completions, encoded once and written as is for every call."""
    host = base.split("://", 1)[1]
    body = json.dumps({"model": model, "prompt": list(range(1, prompt_tokens + 1)), "max_tokens": max_tokens}).encode()
    head = ["POST /v1/completions HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    low = head.lower()
    i = low.find(b"\r\ncontent-length:")
    if i >= 0:
        n = int(low[i + 17:low.index(b"\r\n", i + 2)])
        return status, await reader.readexactly(n)
    parts = []
    while True:  # chunked
        size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return status, b"".join(parts)
        parts.append((await reader.readexactly(size + 2))[:-2])


async def _closed_loop(n: int, senders: list[Callable[[], Awaitable[None]]]) -> tuple[float, list[float]]:
    """`n` calls, each worker sending its next as soon as its last one answered: (wall s, latencies s)."""
    left = n
    lat: list[float] = []

    async def worker(send: Callable[[], Awaitable[None]]) -> None:
        nonlocal left
        clock = time.perf_counter
        while left > 0:
            left -= 1
            t0 = clock()
            await send()
            lat.append(clock() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(send) for send in senders))
    return time.perf_counter() - t0, lat


async def _blast(base: str, request: bytes, n: int, concurrency: int) -> tuple[float, list[float]]:
    """Send `n` calls over `concurrency` keep-alive connections as fast as they answer: (wall s, latencies s)."""
    host, port = base.split("://", 1)[1].rsplit(":", 1)
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(concurrency)]

    def sender(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Callable[[], Awaitable[None]]:
        async def send() -> None:
            writer.write(request)
            status, data = await _read_response(reader)
            if status != 200:
                raise RuntimeError(f"{base}: HTTP {status}: {data[:300]!r}")
        return send

    try:
        return await _closed_loop(n, [sender(r, w) for r, w in conns])
    finally:
        for _, w in conns:
            w.close()


async def _blast_aiohttp(base: str, request: tuple[str, dict[str, str], bytes], n: int,
                         concurrency: int) -> tuple[float, list[float]]:
    """As `_blast`, with an aiohttp client session (what an application's HTTP client costs)."""
    url, headers, body = request
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def send() -> None:
            async with session.post(url, data=body, headers=headers) as r:
                data = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{base}: HTTP {r.status}: {data[:300]!r}")

        return await _closed_loop(n, [send] * concurrency)


async def _blast_openai(base: str, request: tuple[str, dict[str, str], bytes], n: int,
                        concurrency: int) -> tuple[float, list[float]]:
    """As `_blast`, with the openai SDK's AsyncOpenAI (httpx): what an agent's own code sends."""
    import openai

    url, headers, body = request
    doc = json.loads(body)
    key = headers.get("Authorization", "Bearer x").split(" ", 1)[1]
    client = openai.AsyncOpenAI(base_url=url.rsplit("/completions", 1)[0], api_key=key, max_retries=0,
                                http_client=openai.DefaultAsyncHttpxClient(trust_env=False))

    async def send() -> None:
        await client.completions.create(model=doc["model"], prompt=doc["prompt"], max_tokens=doc["max_tokens"])

    try:
        return await _closed_loop(n, [send] * concurrency)
    finally:
        await client.close()


def _aiohttp_request(base: str, model: str, headers: dict[str, str], max_tokens: int,
                     prompt_tokens: int) -> tuple[str, dict[str, str], bytes]:
    body = json.dumps({"model": model, "prompt": list(range(1, prompt_tokens + 1)), "max_tokens": max_tokens}).encode()
    return base + "/v1/completions", {"Content-Type": "application/json", **headers}, body


async def _throughput(args: argparse.Namespace, paths: dict[str, Path_], pids: dict[str, int],
                      client: str = "raw") -> dict[str, Any]:
    """Calls/s of each path at --tput-concurrency, alternating rounds; CPU per call of each process per path.

    `client`: "raw" (one pre-encoded request written on keep-alive connections: the client costs almost
    nothing, so the servers' costs show) or "aiohttp" (a pooled aiohttp session, as an application sends)."""
    make, blast = {"raw": (_raw_request, _blast), "aiohttp": (_aiohttp_request, _blast_aiohttp),
                   "openai": (_aiohttp_request, _blast_openai)}[client]
    reqs = {name: make(base, model, headers, args.tput_max_tokens, args.prompt_tokens)
            for name, (base, model, headers) in paths.items()}
    conc, rounds = args.tput_concurrency, args.tput_rounds
    per_round = max(conc, args.tput_n // rounds)
    for name in paths:  # warm-up
        await blast(paths[name][0], reqs[name], 4 * conc, conc)
    out: dict[str, Any] = {name: {"wall_s": 0.0, "lat": [], "cpu_s": {p: 0.0 for p in ("client", *pids)}, "rounds": []}
                           for name in paths}
    order = ["direct", "gateway"]
    for k in range(rounds):
        for name in (order if k % 2 == 0 else order[::-1]):
            cpu0 = {"client": time.process_time(), **{p: _cpu_s(pid) for p, pid in pids.items()}}
            wall, lat = await blast(paths[name][0], reqs[name], per_round, conc)
            cpu1 = {"client": time.process_time(), **{p: _cpu_s(pid) for p, pid in pids.items()}}
            o = out[name]
            o["wall_s"] += wall
            o["lat"] += lat
            o["rounds"].append(per_round / wall)
            for p in cpu0:
                o["cpu_s"][p] += cpu1[p] - cpu0[p]
    res: dict[str, Any] = {"client": client, "concurrency": conc, "rounds": rounds, "calls_per_round": per_round,
                           "max_tokens": args.tput_max_tokens}
    for name, o in out.items():
        n = len(o["lat"])
        ms = [x * 1e3 for x in o["lat"]]
        res[name] = {"calls": n, "calls_per_s": n / o["wall_s"], "round_calls_per_s": [round(x) for x in o["rounds"]],
                     "p50_ms": statistics.median(ms), "p99_ms": _pct(ms, 0.99),
                     "cpu_ms_per_call": {p: s * 1e3 / n for p, s in o["cpu_s"].items()},
                     "cpu_busy": {p: s / o["wall_s"] for p, s in o["cpu_s"].items()}}
    res["ratio"] = res["gateway"]["calls_per_s"] / res["direct"]["calls_per_s"]
    # What the CPU per call allows, whatever else runs on the machine: each server process is one
    # thread (at most one core), and all the processes of a path share the machine's cores.
    cores = os.cpu_count() or 1
    for name in paths:
        per = {p: ms / 1e3 for p, ms in res[name]["cpu_ms_per_call"].items() if p == "client" or p == "engine"
               or p == name}
        res[name]["cpu_bound_calls_per_s"] = min([1 / per[p] for p in per if p != "client" and per[p] > 0]
                                                 + [cores / sum(per.values())])
    res["cpu_bound_ratio"] = res["gateway"]["cpu_bound_calls_per_s"] / res["direct"]["cpu_bound_calls_per_s"]
    return res


async def _measure(args: argparse.Namespace, paths: dict[str, Path_], pids: dict[str, int]) -> dict[str, Any]:
    rng = random.Random(args.seed)
    doc: dict[str, Any] = {"rows": await _latency(args, paths, rng) if args.n > 0 else []}
    if args.tput_n > 0:
        doc["throughput"] = [await _throughput(args, paths, pids, client)
                             for client in (("raw", "aiohttp", "openai") if args.tput_client == "all" else (args.tput_client,))]
    return doc


async def _inproc(args: argparse.Namespace, paths: dict[str, Path_], pids: dict[str, int], ep: Path,
                  trace: Path) -> dict[str, Any]:
    from scepsy_hpc.gateway import start_gateway

    gw = await start_gateway(ep, None if args.no_trace else trace, time_scale=args.time_scale)
    try:
        return await _measure(args, {**paths, "gateway": (gw.url, *paths["gateway"][1:])}, pids)
    finally:
        await gw.close()


def _endpoints_yaml(args: argparse.Namespace, engine_url: str, served: str) -> str:
    """The gateway's endpoints file, as the daemon writes it: client keys on, the engine's secret given."""
    limit = 1_000_000  # checked on every call, never reached
    sha = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
    return (f"time_scale: {args.time_scale}\n"
            f"auth:\n  keys:\n    - {{id: {KEY_ID}, sha256: {sha}, deployments: ['*'], max_concurrent: {limit}, rpm: {limit}}}\n"
            f"llms:\n  {LLM}:\n    served_model: {served}\n"
            f"    replicas:\n      - {{url: {engine_url}, api_key: {ENGINE_SECRET}}}\n")


def _print(args: argparse.Namespace, doc: dict[str, Any], mode: str, traced: int) -> None:
    print(f"gateway overhead: {args.model} sim engine at time scale {args.time_scale}, gateway {mode}"
          f"{' on uvloop' if args.uvloop else ''}, client keys and "
          f"limits on, {args.prompt_tokens}-token prompts, max_tokens {args.max_tokens}, n={args.n} per path; "
          f"{traced} calls traced; {os.cpu_count()} CPUs")
    if doc["rows"]:
        head = (f"{'scenario':<14} {'metric':<8} {'direct med':>10} {'p90':>8} {'gateway med':>11} {'p90':>8} "
                f"{'added med':>10} {'added p90':>10}")
        print(head)
        print("-" * len(head))
        for r in doc["rows"]:
            d, g = r["direct"], r["gateway"]
            print(f"{r['scenario']:<14} {r['metric']:<8} {d['median_ms']:>8.2f}ms {d['p90_ms']:>6.2f}ms "
                  f"{g['median_ms']:>9.2f}ms {g['p90_ms']:>6.2f}ms {r['added_median_ms']:>+8.2f}ms "
                  f"{r['added_p90_ms']:>+8.2f}ms")
    if "gateway_cpu_ms_per_call" in doc:
        print(f"CPU per call (latency scenarios): gateway {doc['gateway_cpu_ms_per_call']:.2f} ms, engine "
              f"{doc['engine_cpu_ms_per_call']:.2f} ms (/proc, {os.sysconf('SC_CLK_TCK')} Hz ticks)")
    for t in doc.get("throughput", []):
        _print_throughput(t)


def _print_throughput(t: dict[str, Any]) -> None:
    what = {"raw": "raw keep-alive HTTP/1.1 client (one pre-encoded request)",
            "aiohttp": "aiohttp client session (pooled, as an application sends)",
            "openai": "openai SDK AsyncOpenAI (httpx), as an agent's code sends"}[t["client"]]
    print(f"\nthroughput: unary /v1/completions, max_tokens {t['max_tokens']}, concurrency {t['concurrency']}, "
          f"{t['rounds']} alternating rounds of {t['calls_per_round']} calls per path; {what}")
    procs = list(t["direct"]["cpu_ms_per_call"])
    head = (f"{'path':<8} {'calls/s':>8} {'p50':>8} {'p99':>8}  " + "  ".join(f"{p + ' cpu/call':>16}" for p in procs)
            + "  rounds (calls/s)")
    print(head)
    print("-" * len(head))
    for name in ("direct", "gateway"):
        r = t[name]
        cpu = "  ".join(f"{r['cpu_ms_per_call'][p]:>6.3f}ms ({r['cpu_busy'][p]:>4.0%})" for p in procs)
        print(f"{name:<8} {r['calls_per_s']:>8.0f} {r['p50_ms']:>6.2f}ms {r['p99_ms']:>6.2f}ms  {cpu:>16}  "
              f"{' '.join(str(x) for x in r['round_calls_per_s'])}")
    print(f"gateway / direct: {t['ratio']:.0%} of direct calls/s (target >= 70%); added p50 "
          f"{t['gateway']['p50_ms'] - t['direct']['p50_ms']:+.2f} ms; CPU per call (busy share of one core)")
    d, g = t["direct"]["cpu_bound_calls_per_s"], t["gateway"]["cpu_bound_calls_per_s"]
    print(f"CPU-bound ceiling (one core per server process, {os.cpu_count()} cores shared by the path's processes): "
          f"direct {d:.0f}, gateway {g:.0f} calls/s = {t['cpu_bound_ratio']:.0%}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=400, help="calls per path and latency scenario (default 400; 0 skips them)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--model", default="llama-3.2-1b-instruct")
    p.add_argument("--gpu", default="h100-sxm")
    p.add_argument("--time-scale", type=float, default=0.001)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--tput-n", type=int, default=6000, help="throughput: calls per path (default 6000; 0 skips it)")
    p.add_argument("--tput-concurrency", type=int, default=16)
    p.add_argument("--tput-rounds", type=int, default=6, help="throughput: rounds per path, alternating (default 6)")
    p.add_argument("--tput-max-tokens", type=int, default=1)
    p.add_argument("--tput-client", choices=("raw", "aiohttp", "openai", "all"), default="all",
                   help="throughput client: raw pre-encoded HTTP (the servers' cost shows), an aiohttp session, "
                        "the openai SDK (an agent's cost), or all three, one after the other (default)")
    p.add_argument("--inproc", action="store_true", help="run the gateway in this process (shares the client's loop)")
    p.add_argument("--no-trace", action="store_true", help="run the gateway without a trace file")
    p.add_argument("--uvloop", action="store_true",
                   help="run the gateway subprocess on uvloop (it must be importable there, e.g. through PYTHONPATH)")
    p.add_argument("--profile", metavar="FILE", help="run the gateway subprocess under cProfile, stats to FILE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON ('-' for stdout)")
    args = p.parse_args()

    os.environ["SCEPSY_ENGINE_API_KEY"] = ENGINE_SECRET  # the engines inherit it (sim engines that read it check it)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp_s:
        tmp = Path(tmp_s)
        with sim_engines([SimEngineSpec(args.model, args.gpu)], args.time_scale, tmp / "logs") as engines:
            eng = engines[0]
            served = eng.spec.served_name
            ep = tmp / "endpoints.yaml"
            ep.write_text(_endpoints_yaml(args, eng.url, served))
            ep.chmod(0o600)
            trace = tmp / "trace.jsonl"
            paths: dict[str, Path_] = {"direct": (eng.url, served, {"Authorization": f"Bearer {ENGINE_SECRET}"}),
                                       "gateway": ("", LLM, {"Authorization": f"Bearer {CLIENT_KEY}"})}
            pids = {"engine": eng.process.pid}
            if args.inproc:
                doc = asyncio.run(_inproc(args, paths, pids, ep, trace))
                mode = "in-process"
            else:
                port = free_port()
                root = str(Path(__file__).resolve().parent.parent)
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
                cmd = [sys.executable, "-m", "scepsy_hpc.gateway", "--endpoints", str(ep), "--port", str(port)]
                if args.uvloop:
                    cmd[1:3] = ["-c", "import sys, uvloop; uvloop.install(); from scepsy_hpc.gateway.server import main; "
                                      "sys.exit(main(sys.argv[1:]))"]
                if args.profile:
                    cmd[1:3] = ["-m", "cProfile", "-o", str(Path(args.profile).resolve()), "-m", "scepsy_hpc.gateway"]
                cmd += [] if args.no_trace else ["--trace", str(trace)]
                url = f"http://127.0.0.1:{port}"
                proc = supervisor.start(cmd, tmp / "logs" / "gateway.log", what="gateway", health=url, env=env)
                try:
                    supervisor.wait_healthy([proc], timeout_s=20.0)
                    pids["gateway"] = proc.pid
                    cpu0 = _cpu_s(proc.pid), _cpu_s(eng.process.pid)
                    latency_args = argparse.Namespace(**{**vars(args), "tput_n": 0})
                    doc = asyncio.run(_measure(latency_args, {**paths, "gateway": (url, *paths["gateway"][1:])}, pids))
                    cpu1 = _cpu_s(proc.pid), _cpu_s(eng.process.pid)
                    if args.n > 0:
                        n_gw = 40 + 3 * args.n  # warm-up included: the CPU counters cover every call through the gateway
                        doc["gateway_cpu_ms_per_call"] = (cpu1[0] - cpu0[0]) * 1e3 / n_gw
                        doc["engine_cpu_ms_per_call"] = (cpu1[1] - cpu0[1]) * 1e3 / (2 * n_gw)
                    if args.tput_n > 0:
                        gw_paths = {**paths, "gateway": (url, *paths["gateway"][1:])}
                        doc["throughput"] = [asyncio.run(_throughput(args, gw_paths, pids, client)) for client in
                                             (("raw", "aiohttp", "openai") if args.tput_client == "all" else (args.tput_client,))]
                    mode = "subprocess"
                finally:
                    proc.stop()
            traced = sum(1 for line in trace.read_text().splitlines() if '"kind":"call"' in line) if trace.exists() else 0

    _print(args, doc, mode, traced)
    if args.json:
        text = json.dumps({"mode": mode, "time_scale": args.time_scale, "n": args.n, "cpus": os.cpu_count(), **doc},
                          indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
