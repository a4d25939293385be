#!/usr/bin/env python3
"""Prefix-affinity routing, measured: the same ReAct-like load through the gateway with affinity on and off.

    .venv/bin/python scripts/bench_prefix_routing.py [-n 40] [--concurrency 8] [--turns 8] [--time-scale 0.5] [--json]

Per mode (`--modes on,off`), two fresh sim engines (llama-3.1-8b-instruct on h100-sxm, prefix caching
on, so both caches start cold) behind one gateway subprocess (`--prefix-affinity` or
`--no-prefix-affinity`, tracing to a temporary file). The load: `-n` requests, `--concurrency` in
flight, each `--turns` streamed chat calls with a growing context, as a ReAct agent sends them: a
system prompt shared by all requests (`--system-tokens`), the request's own question, then per turn
the assistant's answer (`--max-tokens`, plain text) and an observation of `--tool-tokens` (a user
message: the tool result, after the tool's time, exponential with mean `--tool-s`), each request
under its own id (base URL /r/{id}/v1). Answer lengths vary (max_tokens uniform in [1/2, 3/2] of
`--max-tokens`) and tools take time, so the replicas' loads differ when a request's next call comes:
without them the least-loaded router keeps a closed loop's requests in place by itself. The same seed
gives both modes the same texts, lengths and tool times.

Printed side by side: calls, calls per model second, p50/p99 time to first token and call latency in
model seconds (wall seconds / time scale), the engines' prefix-cache hit rate (sums of both engines'
vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total), prompt tokens prefilled (queries −
hits), how often a request's call went to another replica than its previous call (from the gateway's
trace), the engines' mean iteration lag (model ms; large: this machine could not keep the time scale,
so timings are stretched) and the on/off ratios. `--json` prints one JSON document instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import yaml  # noqa: E402

from scepsy_hpc.engine import supervisor  # noqa: E402
from scepsy_hpc.engine.local import SimEngineSpec, free_port, sim_engines  # noqa: E402
from scepsy_hpc.errors import ScepsyError  # noqa: E402
from scepsy_hpc.profile.replay import lag_counters  # noqa: E402

LLM = "agent"
WORDS = ("alpha", "bravo", "delta", "gamma", "kappa", "sigma", "omega", "theta", "lambda", "zeta", "rho", "tau")
_COUNTER = re.compile(r"^(vllm:prefix_cache_(?:queries|hits)_total)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def _text(rng: random.Random, tokens: int) -> str:
    """About `tokens` pseudo-tokens of text (the sim engine counts 4 characters a token)."""
    out: list[str] = []
    n = 0
    while n < 4 * tokens:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[: 4 * tokens]


def _requests(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The load, the same for every mode: per request its id, question and tool results."""
    rng = random.Random(args.seed)
    system = "You are a ReAct agent. Think, then act with a tool or answer. " + _text(rng, args.system_tokens - 16)
    return [{"id": f"q{i:04d}", "system": system,
             "question": f"Question {i}: " + _text(rng, args.question_tokens),
             "observations": [f"Observation {k}: " + _text(rng, args.tool_tokens) for k in range(args.turns - 1)],
             "tool_s": [rng.expovariate(1 / args.tool_s) if args.tool_s > 0 else 0.0 for _ in range(args.turns - 1)],
             "max_tokens": [rng.randint(max(1, args.max_tokens // 2), args.max_tokens * 3 // 2)
                            for _ in range(args.turns)]}
            for i in range(args.n)]


async def _call(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat call: wall TTFT, latency, the answer's text and usage."""
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.read())[:300]!r}")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            ev = json.loads(line[6:])
            for ch in ev.get("choices") or ():
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(piece)
            if ev.get("usage"):
                usage = ev["usage"]
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "text": "".join(parts), "usage": usage}


async def _drive(args: argparse.Namespace, gw_url: str, served: str, reqs: list[dict[str, Any]]) -> dict[str, Any]:
    """Run every request (`--concurrency` in flight); per-call and per-request wall figures."""
    calls: list[dict[str, Any]] = []
    req_lat: list[float] = []
    todo = iter(reqs)

    async def one(session: aiohttp.ClientSession, q: dict[str, Any]) -> None:
        url = f"{gw_url}/r/{q['id']}/v1/chat/completions"
        msgs = [{"role": "system", "content": q["system"]}, {"role": "user", "content": q["question"]}]
        t0 = time.perf_counter()
        for k in range(args.turns):
            c = await _call(session, url, {"model": LLM, "messages": msgs, "max_tokens": q["max_tokens"][k],
                                           "temperature": 0, "stream": True,
                                           "stream_options": {"include_usage": True}})
            calls.append(c)
            if k < args.turns - 1:
                await asyncio.sleep(q["tool_s"][k] * args.time_scale)  # the tool runs
                msgs = msgs + [{"role": "assistant", "content": c["text"]},
                               {"role": "user", "content": q["observations"][k]}]
        req_lat.append(time.perf_counter() - t0)

    async def worker(session: aiohttp.ClientSession) -> None:
        for q in todo:
            await one(session, q)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "calls": calls, "request_latency": req_lat}


async def _counters(urls: list[str]) -> dict[str, float]:
    """Sum over engines of vllm:prefix_cache_queries_total and _hits_total."""
    tot = {"vllm:prefix_cache_queries_total": 0.0, "vllm:prefix_cache_hits_total": 0.0}
    async with aiohttp.ClientSession(trust_env=False) as session:
        for u in urls:
            async with session.get(u + "/metrics") as r:
                text = await r.text()
            for name, value in _COUNTER.findall(text):
                tot[name] += float(value)
    return tot


def _moves(trace: Path) -> tuple[int, int, dict[str, Any]]:
    """From the gateway's trace: calls that went to another replica than the request's previous call, calls
    that had a previous call, and the gateway's prefix shares of all calls (trace.stats.prefix_shares)."""
    from dataclasses import asdict

    from scepsy_hpc.trace.records import read_trace
    from scepsy_hpc.trace.stats import prefix_shares

    tr = read_trace(trace)
    last: dict[str, str | None] = {}
    moved = follow = 0
    for c in sorted(tr.calls, key=lambda c: c.t_start):
        if c.request in last:
            follow += 1
            moved += c.replica != last[c.request]
        last[c.request] = c.replica
    shares = prefix_shares(tr.calls).get(LLM, {}).get("*")
    return moved, follow, (asdict(shares) if shares else {})


def _run_mode(args: argparse.Namespace, affinity: bool, reqs: list[dict[str, Any]], tmp: Path) -> dict[str, Any]:
    """Fresh engines and gateway, the load, the figures (model seconds)."""
    mode = "on" if affinity else "off"
    logs = tmp / f"logs-{mode}"
    specs = [SimEngineSpec(args.model, args.gpu)] * args.replicas
    with sim_engines(specs, args.time_scale, logs, seed=args.seed) as engines:
        served = engines[0].spec.served_name
        ep = tmp / f"endpoints-{mode}.yaml"
        ep.write_text(yaml.safe_dump({"time_scale": args.time_scale,
                                      "llms": {LLM: {"served_model": served,
                                                     "replicas": [e.url for e in engines]}}}, sort_keys=False))
        trace = tmp / f"trace-{mode}.jsonl"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, "-m", "scepsy_hpc.gateway", "--endpoints", str(ep), "--port", str(port),
               "--trace", str(trace), "--prefix-affinity" if affinity else "--no-prefix-affinity"]
        gw = supervisor.start(cmd, logs / "gateway.log", what="gateway", health=url, env=env)
        try:
            supervisor.wait_healthy([gw], timeout_s=20.0)
            res = asyncio.run(_drive(args, url, served, reqs))
            ctr = asyncio.run(_counters([e.url for e in engines]))
            lags = [lag_counters(e.url) for e in engines]
        finally:
            gw.stop()
    ts = args.time_scale
    calls = res["calls"]
    ttft = [c["ttft"] / ts for c in calls if c["ttft"] is not None]
    lat = [c["latency"] / ts for c in calls]
    q, h = ctr["vllm:prefix_cache_queries_total"], ctr["vllm:prefix_cache_hits_total"]
    moved, follow, shares = _moves(trace)
    # how late the engines' iterations went out on average (model ms): large means this machine could not keep
    # the time scale and the timings are stretched (run with a larger --time-scale)
    lag_ms = max((1e3 * a / b / ts for a, b in (x for x in lags if x) if b > 0), default=float("nan"))
    return {"affinity": affinity, "calls": len(calls), "wall_s": res["wall_s"],
            "model_s": res["wall_s"] / ts, "calls_per_s": len(calls) / (res["wall_s"] / ts),
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p90_s": _pct(ttft, 0.9), "ttft_p99_s": _pct(ttft, 0.99),
            "ttft_max_s": max(ttft, default=float("nan")),
            "latency_p50_s": _pct(lat, 0.5), "latency_p99_s": _pct(lat, 0.99),
            "request_latency_mean_s": statistics.mean(res["request_latency"]) / ts,
            "prefix_cache_queries": q, "prefix_cache_hits": h, "hit_rate": h / q if q else float("nan"),
            "prefill_tokens": q - h,
            "usage_prompt_tokens": sum(c["usage"].get("prompt_tokens", 0) for c in calls),
            "usage_cached_tokens": sum((c["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                                       for c in calls),
            "engine_lag_ms": lag_ms, "replica_moves": moved, "follow_up_calls": follow, "gateway_prefix_share": shares}


ROWS = (("calls", "calls", "d"), ("calls/s (model)", "calls_per_s", ".2f"), ("TTFT p50 s", "ttft_p50_s", ".3f"),
        ("TTFT p90 s", "ttft_p90_s", ".3f"), ("TTFT p99 s", "ttft_p99_s", ".3f"), ("TTFT max s", "ttft_max_s", ".3f"), ("latency p50 s", "latency_p50_s", ".3f"),
        ("latency p99 s", "latency_p99_s", ".3f"), ("request mean s", "request_latency_mean_s", ".2f"),
        ("hit rate", "hit_rate", ".1%"), ("prefill tokens", "prefill_tokens", ".0f"),
        ("replica moves", "replica_moves", "d"), ("engine lag ms", "engine_lag_ms", ".2f"))


def _ratios(doc: dict[str, Any]) -> dict[str, float]:
    on, off = doc["modes"].get("on"), doc["modes"].get("off")
    if not on or not off:
        return {}
    return {key: on[key] / off[key] if off[key] else float("nan") for _, key, _ in ROWS}


def _print(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    print(f"prefix-affinity routing: {args.replicas} sim engines ({args.model} on {args.gpu}, time scale "
          f"{args.time_scale}), {args.n} requests x {args.turns} turns, {args.concurrency} in flight, system "
          f"{args.system_tokens} + tool {args.tool_tokens} tokens/turn, max_tokens ~{args.max_tokens}, tool time ~{args.tool_s} s; "
          f"model seconds")
    modes = list(doc["modes"])
    head = f"{'':<17}" + "".join(f"{'affinity ' + m:>14}" for m in modes) + (f"{'on/off':>10}" if doc["ratios"] else "")
    print(head)
    print("-" * len(head))
    for label, key, fmt in ROWS:
        line = f"{label:<17}" + "".join(f"{format(doc['modes'][m][key], fmt):>14}" for m in modes)
        if doc["ratios"]:
            line += f"{doc['ratios'][key]:>10.3f}"
        print(line)
    for m in modes:
        r = doc["modes"][m]
        s = r["gateway_prefix_share"]
        print(f"affinity {m}: wall {r['wall_s']:.1f} s; usage cached/prompt {r['usage_cached_tokens']}/"
              f"{r['usage_prompt_tokens']}; gateway's prefix share {s.get('prefix_share_mean', float('nan')):.1%}, "
              f"system {s.get('system_share_mean', float('nan')):.1%}; {r['replica_moves']} of "
              f"{r['follow_up_calls']} follow-up calls changed replica")


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the engines and the gateway are stopped on the way out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=40, help="requests per mode (default 40)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--turns", type=int, default=8, help="calls per request (default 8)")
    p.add_argument("--system-tokens", type=int, default=1000, help="shared system prompt (default 1000 tokens)")
    p.add_argument("--question-tokens", type=int, default=50, help="each request's question (default 50 tokens)")
    p.add_argument("--tool-tokens", type=int, default=400, help="each tool result (default 400 tokens)")
    p.add_argument("--max-tokens", type=int, default=64,
                   help="mean answer length (default 64; each call's is uniform in [1/2, 3/2] of it)")
    p.add_argument("--tool-s", type=float, default=0.5,
                   help="mean tool time between turns, model seconds, exponential (default 0.5; 0: none)")
    p.add_argument("--replicas", type=int, default=2, help="sim engines (default 2)")
    p.add_argument("--model", default="llama-3.1-8b-instruct")
    p.add_argument("--gpu", default="h100-sxm")
    p.add_argument("--time-scale", type=float, default=0.5, help="wall seconds per model second (default 0.5)")
    p.add_argument("--modes", default="on,off", help="affinity modes to run, in order (default on,off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = p.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("on", "off")]
    if bad or not modes:
        p.error(f"--modes {args.modes}: give on, off or both, comma-separated (e.g. --modes on,off)")
    for flag, v in (("-n", args.n), ("--concurrency", args.concurrency), ("--turns", args.turns),
                    ("--replicas", args.replicas), ("--max-tokens", args.max_tokens),
                    ("--system-tokens", args.system_tokens - 15), ("--tool-tokens", args.tool_tokens)):
        if v < 1:
            p.error(f"{flag}: must be at least 1 (--system-tokens at least 16)")
    if not args.tool_s >= 0:
        p.error(f"--tool-s {args.tool_s}: must be >= 0")
    if not args.time_scale > 0:
        p.error(f"--time-scale {args.time_scale}: must be > 0")

    signal.signal(signal.SIGTERM, _sigterm)
    reqs = _requests(args)
    doc: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "cpus": os.cpu_count(),
                           "modes": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-prefix-routing-") as tmp:
            for m in modes:
                doc["modes"][m] = _run_mode(args, m == "on", reqs, Path(tmp))
    except KeyboardInterrupt:
        print("interrupted; engines and gateway stopped", file=sys.stderr)
        return 130
    except ScepsyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    doc["ratios"] = _ratios(doc)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print(args, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
