"""End to end with the real simulated engine (a subprocess): unary, streaming and its fault hooks.

The fault hooks are the engine's own (`POST /scepsy/sim/fault`, test hooks on): the gateway never
forwards a client's `X-Sim-*` headers, so a client cannot reach them through it.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import openai
import pytest

from scepsy_hpc.engine.local import SimEngineSpec, sim_engines
from scepsy_hpc.gateway import start_gateway
from scepsy_hpc.trace.records import read_trace

# gateway scenarios take well under a second: a hang fails here instead of blocking the suite
pytestmark = pytest.mark.timeout(10)

MODEL = "llama-3.2-1b-instruct"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    # The engine's fault hooks answer only to an engine started for tests.
    with sim_engines([SimEngineSpec(MODEL, "h100-sxm", test_hooks=True)], 0.001,
                     tmp_path_factory.mktemp("logs")) as engines:
        yield engines[0]


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/r/req-1/v1", api_key="x", max_retries=0,
                              http_client=openai.DefaultAsyncHttpxClient(trust_env=False))


def _endpoints(tmp_path: Path, url: str) -> Path:
    ep = tmp_path / "endpoints.yaml"
    ep.write_text(f"time_scale: 0.001\nllms:\n  small:\n    served_model: {MODEL}\n    replicas: [{url}]\n")
    return ep


async def _set_fault(url: str, fault: dict[str, object]) -> None:
    async with aiohttp.ClientSession(trust_env=False) as http:
        async with http.post(url + "/scepsy/sim/fault", json=fault) as r:
            assert r.status == 200, await r.text()


async def test_gateway_over_sim_engine(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    trace_path = tmp_path / "trace.jsonl"
    gw = await start_gateway(_endpoints(tmp_path, engine.url), trace_path, watch_interval_s=0.0, shutdown_timeout_s=1.0)
    try:
        client = _client(gw.url)
        r = await client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                                 extra_headers={"X-Scepsy-Role": "plan"})
        stream = await client.completions.create(model="small", prompt=list(range(32)), max_tokens=6, stream=True)
        texts = [c.choices[0].text async for c in stream]
        # a client's fault header never reaches the engine
        hooked = await client.completions.create(model="small", prompt="x", max_tokens=2,
                                                 extra_headers={"X-Sim-Fault": "http500"})
    finally:
        await gw.close()
    assert r.usage is not None and r.usage.completion_tokens == 4
    assert len(texts) == 6
    assert hooked.usage is not None and hooked.usage.completion_tokens == 2
    trace = read_trace(trace_path)
    assert trace.meta["time_scale"] == 0.001
    assert [(c.status, c.stream, c.completion_tokens) for c in trace.calls] == [
        ("ok", False, 4), ("ok", True, 6), ("ok", False, 2)]
    assert trace.calls[0].role == "plan" and all(c.request == "req-1" for c in trace.calls)
    assert trace.calls[1].prompt_tokens == 32 and trace.calls[1].t_first is not None


async def test_engine_faults_show_through_the_gateway(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    trace_path = tmp_path / "trace.jsonl"
    gw = await start_gateway(_endpoints(tmp_path, engine.url), trace_path, watch_interval_s=0.0, shutdown_timeout_s=1.0)
    client = _client(gw.url)
    got = []
    try:
        await _set_fault(engine.url, {"http500": True})
        with pytest.raises(openai.InternalServerError) as e500:
            await client.completions.create(model="small", prompt="x", max_tokens=2)
        await _set_fault(engine.url, {"http500": False, "abort_after": 3})
        cut = await client.completions.create(model="small", prompt="x", max_tokens=8, stream=True)
        with pytest.raises(openai.APIError) as ecut:
            async for c in cut:
                got.append(c)
    finally:
        await _set_fault(engine.url, {"http500": False, "abort_after": None})
        await gw.close()
    assert "simulated engine failure" in e500.value.message and "llm 'small'" in e500.value.message
    assert "mid-stream" in ecut.value.message and len(got) == 3
    trace = read_trace(trace_path)
    assert [(c.status, c.stream) for c in trace.calls] == [("error", False), ("error", True)]
