"""The simulated engine as a real server process, spoken to with the openai SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time

import aiohttp
import openai
import pytest

from scepsy_hpc.engine.local import SimEngineSpec, start_sim_engines, stop_engines
from scepsy_hpc.engine.openai_protocol import TOKEN_TEXT
from scepsy_hpc.engine.sim_server import SimEngineServer, main
from scepsy_hpc.errors import EngineError, SpecError
from scepsy_hpc.perf.model import EngineConfig, EnginePerf

SCALE = 0.02  # 50x faster than the modelled GPU
LLAMA, PRM = "llama-3.1-8b-instruct", "qwen2.5-math-prm-7b"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    specs = [SimEngineSpec(LLAMA, "h100-sxm", test_hooks=True), SimEngineSpec(PRM, "h100-sxm", served_model_name="prm")]
    engs = start_sim_engines(specs, SCALE, tmp_path_factory.mktemp("engine-logs"))
    yield {"llama": engs[0], "prm": engs[1]}
    stop_engines(engs)
    assert all(e.process.returncode is not None for e in engs)


def _client(eng) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=eng.api_base, api_key="x", max_retries=0)


def _run(coro):
    return asyncio.run(coro)


async def _metrics(eng) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(f"{eng.url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _m(metrics: dict[str, float], name: str, extra: str = "") -> float:
    return metrics[f'{name}{{{extra}model_name="{LLAMA}"}}']


def test_completion_gives_exactly_max_tokens(engines):
    async def go():
        async with _client(engines["llama"]) as c:
            r = await c.completions.create(model=LLAMA, prompt="x" * 41, max_tokens=7)
            ids = await c.completions.create(model=LLAMA, prompt=[11] * 123, max_tokens=2, extra_body={"ignore_eos": True})
            nested = await c.completions.create(model=LLAMA, prompt=[[5, 6, 7]], max_tokens=1)
        return r, ids, nested

    r, ids, nested = _run(go())
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 7, 18)  # ceil(41/4)
    assert r.choices[0].text == TOKEN_TEXT * 7 and r.choices[0].finish_reason == "length"
    assert ids.usage.prompt_tokens == 123 and ids.usage.completion_tokens == 2
    assert nested.usage.prompt_tokens == 3


def test_chat_counts_messages_and_streams_with_usage(engines):
    messages = [{"role": "system", "content": "s" * 10}, {"role": "user", "content": "u" * 8}]

    async def go():
        async with _client(engines["llama"]) as c:
            full = await c.chat.completions.create(model=LLAMA, messages=messages, max_completion_tokens=5)
            stream = await c.chat.completions.create(model=LLAMA, messages=messages, max_tokens=6, stream=True,
                                                     stream_options={"include_usage": True})
            chunks = [ch async for ch in stream]
            plain = await c.completions.create(model=LLAMA, prompt="hello", max_tokens=4, stream=True)
            texts = [ch.choices[0].text async for ch in plain]
        return full, chunks, texts

    full, chunks, texts = _run(go())
    assert full.usage.prompt_tokens == (3 + 4) + (2 + 4)  # ceil(chars/4) + 4 per message
    assert full.choices[0].message.content == TOKEN_TEXT * 5 and full.usage.completion_tokens == 5
    deltas = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert deltas == [TOKEN_TEXT] * 6
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == 13
    assert texts == [TOKEN_TEXT] * 4


def test_models_health_and_metrics(engines):
    async def go():
        eng = engines["llama"]
        async with _client(engines["prm"]) as c:
            models = await c.models.list()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{eng.url}/health") as r:
                health = r.status
            async with s.get(f"{engines['prm'].api_base}/models") as r:
                raw = await r.json()
        before = await _metrics(eng)
        async with _client(eng) as c:
            await c.completions.create(model=LLAMA, prompt=[1] * 50, max_tokens=9)
        return models, health, raw, before, await _metrics(eng)

    models, health, raw, before, after = _run(go())
    assert [m.id for m in models.data] == ["prm"]
    assert raw["data"][0]["max_model_len"] == 4096 and raw["data"][0]["owned_by"] == "scepsy-sim"
    assert health == 200
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert _m(after, name) == 0
    diff = lambda name, extra="": _m(after, name, extra) - _m(before, name, extra)  # noqa: E731
    assert diff("vllm:prompt_tokens_total") == 50 and diff("vllm:generation_tokens_total") == 9
    assert diff("vllm:request_success_total", 'finished_reason="length",') == 1
    assert diff("vllm:time_to_first_token_seconds_count") == 1 and diff("vllm:time_per_output_token_seconds_count") == 8
    assert diff("vllm:e2e_request_latency_seconds_count") == 1
    assert _m(after, "vllm:e2e_request_latency_seconds_bucket", 'le="+Inf",') == _m(after, "vllm:e2e_request_latency_seconds_count")


def test_errors_are_vllm_shaped(engines):
    async def go():
        out = {}
        async with _client(engines["prm"]) as c:
            for key, kw in (("404", {"model": "nope"}), ("400", {"model": "prm", "max_tokens": 200})):
                try:
                    await c.completions.create(prompt=[1] * 4000, **{"max_tokens": 1, **kw})
                except openai.APIStatusError as exc:
                    out[key] = exc
        async with aiohttp.ClientSession() as s:
            for key, data in (("json", b"{not json"), ("field", b'{"model": "prm"}')):
                async with s.post(f"{engines['prm'].api_base}/completions", data=data) as r:
                    out[key] = (r.status, await r.json())
        return out

    out = _run(go())
    assert isinstance(out["404"], openai.NotFoundError)
    assert out["404"].body["message"] == "The model `nope` does not exist."
    assert isinstance(out["400"], openai.BadRequestError)
    assert "4096" in out["400"].message and "4200" in out["400"].message
    for status, body in (out["json"], out["field"]):
        assert status == 400
        assert body["object"] == "error" and body["type"] == "BadRequestError" and body["code"] == 400 and body["param"] is None


def test_wall_latency_is_model_latency_times_scale(engines, models, gpus):
    perf = EnginePerf(EngineConfig(models[LLAMA], gpus["h100-sxm"]))
    model_s = perf.request_latency(25, 1500)

    async def go():
        eng = engines["llama"]
        async with _client(eng) as c:
            await c.completions.create(model=LLAMA, prompt="warm up the client", max_tokens=1)
            before = await _metrics(eng)
            t = time.perf_counter()
            r = await c.completions.create(model=LLAMA, prompt=[1] * 25, max_tokens=1500)
            wall = time.perf_counter() - t
        return r, wall, before, await _metrics(eng)

    r, wall, before, after = _run(go())
    assert r.usage.completion_tokens == 1500
    assert model_s * SCALE * 0.7 < wall < model_s * SCALE * 1.3, (wall, model_s * SCALE)
    reported = _m(after, "vllm:e2e_request_latency_seconds_sum") - _m(before, "vllm:e2e_request_latency_seconds_sum")
    assert reported == pytest.approx(model_s, rel=0.05)  # metrics are in model seconds, not wall seconds


async def _poll_running(eng, want: float, timeout_s: float = 3.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = await _metrics(eng)
        if _m(m, "vllm:num_requests_running") == want or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_the_request(engines, stream):
    async def go():
        eng = engines["llama"]
        body = {"model": LLAMA, "prompt": "hi", "max_tokens": 100_000, "stream": stream}  # ~16 s wall if left to run
        async with aiohttp.ClientSession() as s:

            async def call() -> None:
                async with s.post(f"{eng.api_base}/completions", json=body) as r:
                    await r.read()

            task = asyncio.create_task(call())
            running = await _poll_running(eng, 1)
            task.cancel()  # the client gives up: aiohttp closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task
        return running, await _poll_running(eng, 0)

    running, after = _run(go())
    assert _m(running, "vllm:num_requests_running") == 1 and _m(running, "vllm:kv_cache_usage_perc") > 0
    assert _m(after, "vllm:num_requests_running") == 0 and _m(after, "vllm:kv_cache_usage_perc") == 0


def test_without_max_tokens_the_length_is_sampled(engines, models, gpus):
    perf = EnginePerf(EngineConfig(models[LLAMA], gpus["h100-sxm"]))
    make = lambda seed: SimEngineServer(perf, served_name="m", time_scale=1, max_model_len=4096,  # noqa: E731
                                        default_output_tokens=200, seed=seed)
    server = make(1)
    xs = [server.sample_output_tokens(10) for _ in range(4000)]
    mean = sum(xs) / len(xs)
    cv = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) / mean
    assert 190 < mean < 210 and 0.45 < cv < 0.55
    a, b = make(3), make(3)
    assert [a.sample_output_tokens(10) for _ in range(5)] == [b.sample_output_tokens(10) for _ in range(5)]
    assert max(server.sample_output_tokens(4000) for _ in range(200)) <= 96

    async def go():
        async with _client(engines["llama"]) as c:
            return await c.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": "hi"}])

    r = _run(go())
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens >= 1
    assert r.choices[0].message.content == TOKEN_TEXT * r.usage.completion_tokens


def test_fault_http500(engines):
    async def go():
        async with _client(engines["llama"]) as c:
            with pytest.raises(openai.InternalServerError) as exc:
                await c.completions.create(model=LLAMA, prompt="a", max_tokens=3, extra_headers={"X-Sim-Fault": "http500"})
        return exc.value

    exc = _run(go())
    assert exc.status_code == 500 and exc.body["type"] == "InternalServerError"


def test_fault_abort_after_k(engines):
    async def go():
        url = f"{engines['llama'].api_base}/completions"
        headers = {"X-Sim-Fault": "abort-after:3"}
        lines: list[bytes] = []
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.post(url, json={"prompt": "a", "max_tokens": 10, "stream": True}, headers=headers) as r:
                    async for line in r.content:
                        lines.append(line)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ServerDisconnectedError):
                async with s.post(url, json={"prompt": "a", "max_tokens": 10}, headers=headers) as r:
                    await r.read()
        return lines

    lines = _run(go())
    data = [json.loads(ln[6:]) for ln in lines if ln.startswith(b"data: {")]
    assert [d["choices"][0]["text"] for d in data] == [TOKEN_TEXT] * 3
    assert not any(ln.startswith(b"data: [DONE]") for ln in lines)


def test_bad_arguments_exit_2_with_one_line(capsys):
    assert main(["--model", "nope", "--gpu", "h100-sxm"]) == 2
    assert main(["--model", "llama-3.1-70b-instruct", "--gpu", "h100-sxm", "--tp", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "'nope' is not in the model catalog" in err[0] and "raise tp or gpu_frac" in err[1]
    assert "Traceback" not in "".join(err)


def test_start_failure_quotes_the_engine_log(tmp_path):
    with pytest.raises(EngineError) as exc:
        start_sim_engines([SimEngineSpec("llama-3.1-70b-instruct", "a10g")], SCALE, tmp_path)
    msg = str(exc.value)
    assert "exited with code 2" in msg and re.search(r"needs [\d.]+ GiB", msg)


def test_debug_keeps_the_traceback_of_bad_arguments(monkeypatch):
    monkeypatch.setenv("SCEPSY_DEBUG", "1")
    with pytest.raises(SpecError) as exc:
        main(["--model", "llama-3.1-70b-instruct", "--gpu", "h100-sxm", "--tp", "1"])
    assert "raise tp or gpu_frac" in str(exc.value)
