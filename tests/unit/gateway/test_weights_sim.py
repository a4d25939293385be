"""Capacity weights end to end: two unlike sim engines of one LLM (tp=2 and half a GPU, a mixed group) behind
the gateway, with the weights `scepsy up` writes (`perf.fit.replica_weights`), share a steady load by weight.

Under a closed loop the router keeps the outstanding calls split as the weights are (least
`(outstanding+1)/weight`); the calls each engine completes follow outstanding / latency, so the slower
half-GPU engine completes a little less than its weight's share (see scripts/bench_weighted_routing.py)."""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from scepsy_hpc.engine.local import LocalEngine, SimEngineSpec, sim_engines
from scepsy_hpc.gateway import start_gateway
from scepsy_hpc.trace.records import read_trace

pytestmark = pytest.mark.timeout(30)

MODEL = "llama-3.1-8b-instruct"
TIME_SCALE = 0.2
CLIENTS = 17   # in flight at once: 13 + 4 at weights 37.3 : 11.8


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalEngine]]:
    specs = [SimEngineSpec(MODEL, "h100-sxm", tp=2, prefix_caching=False),
             SimEngineSpec(MODEL, "h100-sxm", gpu_frac=0.5, prefix_caching=False)]
    with sim_engines(specs, TIME_SCALE, tmp_path_factory.mktemp("logs")) as started:
        yield started


def _weights() -> list[float]:
    from scepsy_hpc.perf.fit import replica_weights
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.plan import LLMAlloc

    return replica_weights([LLMAlloc(tp=2), LLMAlloc(gpu_frac=0.5)], load_models(None)[MODEL],
                           load_gpus(None)["h100-sxm"])


async def _closed_loop(engines: list[LocalEngine], weights: list[float], tmp: Path,
                       seconds: float = 2.5) -> dict[str, Any]:
    """CLIENTS clients each sending one call after another for `seconds` wall seconds; the heavy (tp=2) engine's
    share of the outstanding calls (sampled while all CLIENTS are placed) and of the calls completed (the trace),
    and the mean latency."""
    ep, trace = tmp / "endpoints.yaml", tmp / "trace.jsonl"
    reps = "".join(f"      - {{url: {e.url}, weight: {w!r}}}\n" for e, w in zip(engines, weights))
    ep.write_text(f"time_scale: {TIME_SCALE}\nllms:\n  gen:\n    served_model: {MODEL}\n    replicas:\n{reps}")
    gw = await start_gateway(ep, trace, watch_interval_s=0.0, shutdown_timeout_s=5.0, prefix_affinity=False)
    heavy_url = engines[0].url
    stop = asyncio.Event()
    shares: list[float] = []
    try:
        async with aiohttp.ClientSession(trust_env=False, connector=aiohttp.TCPConnector(limit=0)) as http:
            async def client(k: int) -> None:
                while not stop.is_set():
                    body = {"model": "gen", "prompt": [1000 + k] * 512, "max_tokens": 32}
                    async with http.post(gw.url + "/v1/completions", json=body) as r:
                        await r.read()
                        assert r.status == 200

            tasks = [asyncio.create_task(client(k)) for k in range(CLIENTS)]
            pool = gw.state.router.pools()[0]
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            await asyncio.sleep(0.3)   # every client's first call placed
            while loop.time() < end:
                out = {st.url: st.outstanding for st in pool.replicas}
                if sum(out.values()) == CLIENTS:   # every client's call placed (none between two calls)
                    shares.append(out[heavy_url] / CLIENTS)
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.gather(*tasks)
            async with http.get(gw.url + "/scepsy/v1/stats") as r:
                states = (await r.json())["models"]["gen"]["replica_states"]
    finally:
        await gw.close()
    calls = read_trace(trace).calls
    heavy = sum(1 for c in calls if c.replica == heavy_url)
    assert len(shares) >= 20, f"only {len(shares)} samples with every call placed"
    # GET /scepsy/v1/stats shows each replica's weight and the calls routed to it: the trace's count
    assert [(st["url"], st["weight"]) for st in states] == [(e.url, w) for e, w in zip(engines, weights)]
    assert [st["calls"] for st in states] == [sum(1 for c in calls if c.replica == e.url) for e in engines]
    return {"outstanding_share": statistics.fmean(shares), "calls_share": heavy / len(calls), "calls": len(calls),
            "mean_s": statistics.fmean(c.duration_s for c in calls)}


async def test_unlike_replicas_share_a_steady_load_by_weight(engines: list[LocalEngine], tmp_path: Path) -> None:
    w = _weights()
    share = w[0] / sum(w)   # ~0.76: 37.3 : 11.8
    weighted = await _closed_loop(engines, w, tmp_path)
    assert weighted["calls"] > 100, weighted
    # the router holds the outstanding calls at the weights' split (13 : 4 of 17), within a call
    assert weighted["outstanding_share"] == pytest.approx(share, abs=1 / CLIENTS), (share, weighted)
    # and the tp=2 engine completes at least its weight's share of the calls (it is also the faster per call)
    assert share - 0.03 <= weighted["calls_share"] <= 0.92, (share, weighted)
    (tmp_path / "even").mkdir()
    even = await _closed_loop(engines, [1.0, 1.0], tmp_path / "even")
    # with weights 1 (least outstanding), half the calls in flight sit on the half-GPU engine
    assert even["outstanding_share"] == pytest.approx(0.5, abs=1 / CLIENTS), even
    assert even["calls_share"] < weighted["calls_share"] - 0.1, (even, weighted)
