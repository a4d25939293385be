"""The simulated engine's /metrics, scraped over HTTP and read with prometheus_client's own parser."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scepsy_hpc.engine.metrics import EngineMetrics, engine_registry
from scepsy_hpc.engine.sim_server import SimEngineServer
from scepsy_hpc.perf.model import EngineConfig, EnginePerf
from scepsy_hpc.profile.replay import lag_counters

pytestmark = pytest.mark.timeout(30)

LLAMA = "llama-3.1-8b-instruct"
# The families and samples exposed before prometheus_client wrote them (vLLM's names): a scraper
# (Grafana, the gateway, profiling) must see exactly these.
FAMILIES = [
    ("vllm:num_requests_running", "gauge"),
    ("vllm:num_requests_waiting", "gauge"),
    ("vllm:kv_cache_usage_perc", "gauge"),
    ("vllm:prompt_tokens_total", "counter"),
    ("vllm:generation_tokens_total", "counter"),
    ("vllm:prefix_cache_queries_total", "counter"),
    ("vllm:prefix_cache_hits_total", "counter"),
    ("vllm:request_success_total", "counter"),
    ("vllm:time_to_first_token_seconds", "histogram"),
    ("vllm:time_per_output_token_seconds", "histogram"),
    ("vllm:e2e_request_latency_seconds", "histogram"),
    ("scepsy_sim_delivery_lag_seconds_total", "counter"),
    ("scepsy_sim_iterations_delivered_total", "counter"),
]
HISTOGRAMS = [name for name, kind in FAMILIES if kind == "histogram"]
SAMPLES = {name for name, kind in FAMILIES if kind != "histogram"} | {
    name + suffix for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}


def _type_lines(text: str) -> list[tuple[str, str]]:
    return [(line.split()[2], line.split()[3]) for line in text.splitlines() if line.startswith("# TYPE ")]


async def _serve(server: SimEngineServer) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(server.make_app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_scrape_has_vllm_names_and_counts_a_request(models, gpus) -> None:
    perf = EnginePerf(EngineConfig(models[LLAMA], gpus["h100-sxm"]))
    server = SimEngineServer(perf, served_name=LLAMA, time_scale=0.001, max_model_len=4096)
    runner, url = await _serve(server)
    try:
        async with aiohttp.ClientSession(trust_env=False) as http:
            async with http.post(url + "/v1/completions", json={"model": LLAMA, "prompt": [1] * 40, "max_tokens": 5}) as r:
                assert r.status == 200
            async with http.get(url + "/metrics") as r:
                status, content_type, text = r.status, r.headers["Content-Type"], await r.text()
    finally:
        await runner.cleanup()
    assert status == 200 and content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert _type_lines(text) == FAMILIES
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    assert {s.name for s in samples} == SAMPLES  # no `_created` series, nothing renamed
    assert all(s.labels["model_name"] == LLAMA for s in samples)
    value = {(s.name, s.labels.get("finished_reason"), s.labels.get("le")): s.value for s in samples}
    assert value[("vllm:prompt_tokens_total", None, None)] == 40
    assert value[("vllm:generation_tokens_total", None, None)] == 5
    # 40 prompt tokens looked up; 2 full blocks but nothing cached yet on a fresh engine
    assert value[("vllm:prefix_cache_queries_total", None, None)] == 40
    assert value[("vllm:prefix_cache_hits_total", None, None)] == 0
    assert value[("vllm:request_success_total", "length", None)] == 1
    assert value[("vllm:request_success_total", "stop", None)] == 0
    assert value[("vllm:time_per_output_token_seconds_count", None, None)] == 4
    assert value[("vllm:e2e_request_latency_seconds_bucket", None, "+Inf")] == 1
    assert value[("vllm:num_requests_running", None, None)] == 0


def test_histogram_buckets_are_cumulative_with_vllm_bounds() -> None:
    m = EngineMetrics('a "quoted" \\ name')
    for x in (0.0005, 0.05, 0.05, 3000.0):
        m.ttft.observe(x)
    m.ttft.observe(0.06)  # on a bound: `le` includes it
    registry = engine_registry(m, lambda: (2, 3, 0.5))
    (ttft,) = [f for f in registry.collect() if f.name == "vllm:time_to_first_token_seconds"]
    buckets = {s.labels["le"]: s.value for s in ttft.samples if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 1 and buckets["0.04"] == 1 and buckets["0.06"] == 4 and buckets["2560.0"] == 4
    assert buckets["+Inf"] == 5 and list(buckets)[-1] == "+Inf"
    (total,) = [s.value for s in ttft.samples if s.name.endswith("_sum")]
    assert total == pytest.approx(3000.1605)
    # label values are escaped on the way out and read back intact
    parsed = list(text_string_to_metric_families(generate_latest(registry).decode()))
    running = next(f for f in parsed if f.name == "vllm:num_requests_running")
    assert running.samples[0].labels == {"model_name": 'a "quoted" \\ name'} and running.samples[0].value == 2


def test_each_engine_has_its_own_registry(models, gpus) -> None:
    perf = EnginePerf(EngineConfig(models[LLAMA], gpus["h100-sxm"]))
    a = SimEngineServer(perf, served_name="a", time_scale=1, max_model_len=4096)
    b = SimEngineServer(perf, served_name="b", time_scale=1, max_model_len=4096)
    a.metrics.prompt_tokens = 7
    assert a.registry is not b.registry and a.registry is not REGISTRY
    read = lambda s: {x.labels["model_name"]: x.value for f in s.registry.collect() for x in f.samples  # noqa: E731
                      if x.name == "vllm:prompt_tokens_total"}
    assert read(a) == {"a": 7} and read(b) == {"b": 0}
    assert not any(f.name.startswith("vllm:") for f in REGISTRY.collect())


async def test_profiling_reads_the_lag_counters_with_prometheus_clients_parser(models, gpus) -> None:
    perf = EnginePerf(EngineConfig(models[LLAMA], gpus["h100-sxm"]))
    server = SimEngineServer(perf, served_name=LLAMA, time_scale=0.001, max_model_len=4096)
    server.metrics.lag_s, server.metrics.deliveries = 0.25, 12
    runner, url = await _serve(server)
    async def not_metrics(_: web.Request) -> web.Response:
        return web.Response(text="<html>not metrics</html>")

    other = web.Application()  # an engine that is not ours: /metrics is not Prometheus text
    other.router.add_get("/metrics", not_metrics)
    other_runner = web.AppRunner(other, access_log=None)
    await other_runner.setup()
    await web.TCPSite(other_runner, "127.0.0.1", 0).start()
    try:
        ours = await asyncio.to_thread(lag_counters, url)
        theirs = await asyncio.to_thread(lag_counters, f"http://127.0.0.1:{other_runner.addresses[0][1]}")
    finally:
        await runner.cleanup()
        await other_runner.cleanup()
    assert ours is not None and ours[0] == pytest.approx(0.25) and ours[1] >= 12
    assert theirs is None
