"""End to end with the real simulated engine (a subprocess): unary, streaming and its fault hooks."""

from __future__ import annotations

from pathlib import Path

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
    with sim_engines([SimEngineSpec(MODEL, "h100-sxm")], 0.001, tmp_path_factory.mktemp("logs")) as engines:
        yield engines[0]


async def test_gateway_over_sim_engine(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ep = tmp_path / "endpoints.yaml"
    ep.write_text(f"time_scale: 0.001\nllms:\n  small:\n    served_model: {MODEL}\n    replicas: [{engine.url}]\n")
    trace_path = tmp_path / "trace.jsonl"
    gw = await start_gateway(ep, trace_path, watch_interval_s=0.0, shutdown_timeout_s=1.0)
    try:
        client = openai.AsyncOpenAI(base_url=gw.url + "/r/req-1/v1", api_key="x", max_retries=0,
                                    http_client=openai.DefaultAsyncHttpxClient(trust_env=False))
        r = await client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                                 extra_headers={"X-Scepsy-Role": "plan"})
        stream = await client.completions.create(model="small", prompt=list(range(32)), max_tokens=6, stream=True)
        texts = [c.choices[0].text async for c in stream]
        with pytest.raises(openai.InternalServerError) as e500:
            await client.completions.create(model="small", prompt="x", max_tokens=2, extra_headers={"X-Sim-Fault": "http500"})
        cut = await client.completions.create(model="small", prompt="x", max_tokens=8, stream=True,
                                              extra_headers={"X-Sim-Fault": "abort-after:3"})
        got = []
        with pytest.raises(openai.APIError) as ecut:
            async for c in cut:
                got.append(c)
    finally:
        await gw.close()
    assert r.usage is not None and r.usage.completion_tokens == 4
    assert len(texts) == 6
    assert "simulated engine failure" in e500.value.message and "llm 'small'" in e500.value.message
    assert "mid-stream" in ecut.value.message and len(got) == 3
    trace = read_trace(trace_path)
    assert trace.meta["time_scale"] == 0.001
    assert [(c.status, c.stream, c.completion_tokens) for c in trace.calls] == [
        ("ok", False, 4), ("ok", True, 6), ("error", False, None), ("error", True, None)]
    assert trace.calls[0].role == "plan" and all(c.request == "req-1" for c in trace.calls)
    assert trace.calls[1].prompt_tokens == 32 and trace.calls[1].t_first is not None
