"""Soak: a gateway in a subprocess, in front of in-process sim engines, takes 2,000 legitimate calls with
200 slow or aborted clients mixed in; no legitimate call fails and its RSS returns to where it started."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from scepsy_hpc.engine.sim_server import SimEngineServer
from scepsy_hpc.perf.model import EngineConfig, EnginePerf

pytestmark = pytest.mark.timeout(60)   # about 10 s here

SERVED = "llama-3.2-1b-instruct"
SCALE = 0.001
KEY = "sk-scepsy-50a50a50-" + "S" * 43
ROOT = Path(__file__).resolve().parents[3]
CHAT_PATH = "/v1/chat/completions"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def legit(http: aiohttp.ClientSession, url: str, i: int) -> int:
    body = {"model": "demo/small", "messages": [{"role": "user", "content": f"call {i}"}], "max_tokens": 4,
            "stream": i % 2 == 0}
    async with http.post(url + CHAT_PATH, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        await r.read()
        return r.status


async def hostile(url: str, i: int) -> None:
    """One of: half a body then stall (cut by the gateway), half a body then reset, a stream closed mid-way."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    kind = i % 3
    try:
        if kind == 2:
            body = json.dumps({"model": "demo/small", "messages": [{"role": "user", "content": "x"}],
                               "max_tokens": 64, "stream": True}).encode()
        else:
            body = b'{"model": "demo/small", "messages": [' + b" " * 200_000 + b"]}"
        head = (f"POST {CHAT_PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        if kind == 2:
            writer.write(head + body)
            await writer.drain()
            await reader.readuntil(b"data: ")   # the stream began: go away
        else:
            writer.write(head + body[: len(body) // 2])
            await writer.drain()
            if kind == 0:   # stall until the gateway cuts us (408, then it closes)
                await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.transport.abort()


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_2000_calls_with_200_hostile_clients_fail_none_and_leave_rss_where_it_was(models, gpus,  # type: ignore[no-untyped-def]
                                                                                       tmp_path: Path) -> None:
    runners, urls = [], []
    for seed in range(2):
        perf = EnginePerf(EngineConfig(models[SERVED], gpus["h100-sxm"]))
        server = SimEngineServer(perf, served_name=SERVED, time_scale=SCALE, max_model_len=4096, seed=seed)
        runner, url = await _serve(server.make_app())
        runners.append(runner)
        urls.append(url)
    ep = tmp_path / "endpoints.yaml"
    ep.write_text(f"time_scale: {SCALE}\nauth:\n  keys:\n    - {{id: 50a50a50, sha256: "
                  f"{hashlib.sha256(KEY.encode()).hexdigest()}, deployments: [demo]}}\nllms:\n  demo/small:\n"
                  f"    served_model: {SERVED}\n    replicas: [{', '.join(urls)}]\n")
    port = free_port()
    log_path = tmp_path / "gateway.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "scepsy_hpc.gateway", "--endpoints", str(ep), "--port",
                                 str(port), "--client-timeout-s", "1", "--trace", str(tmp_path / "trace.jsonl")],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    gw = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(trust_env=False,
                                         connector=aiohttp.TCPConnector(limit=32)) as http:
            for _ in range(200):
                try:
                    async with http.get(gw + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            rnd = random.Random(0)

            async def batch(n_legit: int, n_hostile: int, offset: int) -> list[int]:
                jobs = [legit(http, gw, offset + i) for i in range(n_legit)]
                jobs += [hostile(gw, i) for i in range(n_hostile)]
                rnd.shuffle(jobs)
                sem = asyncio.Semaphore(48)

                async def run(job):  # type: ignore[no-untyped-def]
                    async with sem:
                        return await job

                got = await asyncio.gather(*(run(j) for j in jobs), return_exceptions=True)
                return [g for g in got if isinstance(g, int)]

            warm = await batch(2000, 200, 0)   # allocator, pools and windows reach their size first; not counted
            await asyncio.sleep(1.5)          # the warm-up's stalled clients are cut (1 s)
            rss_before = rss_kib(proc.pid)
            t0 = time.monotonic()
            statuses = await batch(2000, 200, 10_000)
            elapsed = time.monotonic() - t0
            await asyncio.sleep(1.5)
            async with http.get(gw + "/scepsy/v1/stats", headers={"Authorization": f"Bearer {KEY}"}) as r:
                stats = await r.json()
            rss_after = rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
        for r in runners:
            await r.cleanup()
    log_text = log_path.read_text()
    print(f"\nsoak: {len(statuses)} legitimate calls ({statuses.count(200)} ok) + 200 hostile clients in "
          f"{elapsed:.1f} s; gateway RSS {rss_before / 1024:.1f} MiB before, {rss_after / 1024:.1f} MiB after "
          f"({100 * (rss_after - rss_before) / rss_before:+.1f} %); refused {stats['refused']}; "
          f"{len(log_text.splitlines())} log lines")
    assert warm.count(200) == 2000
    assert len(statuses) == 2000 and statuses.count(200) == 2000
    assert abs(rss_after - rss_before) <= 0.10 * rss_before
    assert stats["auth"]["per_key"]["50a50a50"]["in_flight"] == 0
    assert "Traceback" not in log_text and KEY not in log_text
