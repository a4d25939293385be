"""The sim engine's wedge fault (a wedged vLLM: /health 200, requests queue, no token, counters frozen) and the
reading of an engine's /metrics as its load (vLLM's names, SGLang's), which the agent's watchdog relies on."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest
from aiohttp import web

from scepsy_hpc.engine.metrics import EngineLoad, parse_load, scrape_load
from scepsy_hpc.engine.sim_server import FAULT_ENV, FAULT_PATH, TEST_HOOKS_ENV, SimEngineServer, build_arg_parser, \
    build_server, main, parse_fault_env
from scepsy_hpc.errors import SpecError
from scepsy_hpc.perf.model import EngineConfig, EnginePerf

pytestmark = pytest.mark.timeout(30)

MODEL = "llama-3.2-1b-instruct"


async def _serve(server: SimEngineServer) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(server.make_app(), access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _load(url: str) -> EngineLoad:
    load = await asyncio.to_thread(scrape_load, url)
    assert load is not None
    return load


async def _complete(http: aiohttp.ClientSession, url: str, max_tokens: int) -> int:
    async with http.post(f"{url}/v1/completions", json={"prompt": [1] * 30, "max_tokens": max_tokens}) as r:
        assert r.status == 200
        return (await r.json())["usage"]["completion_tokens"]


async def _until(check, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while not (got := await check()) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return got


async def test_a_wedged_engine_answers_health_and_queues_requests_but_generates_nothing(models, gpus) -> None:
    server = SimEngineServer(EnginePerf(EngineConfig(models[MODEL], gpus["h100-sxm"])), served_name="m",
                             time_scale=0.02, max_model_len=4096, test_hooks=True)
    runner, url = await _serve(server)
    try:
        async with aiohttp.ClientSession(trust_env=False) as http:
            assert await _complete(http, url, 5) == 5
            before = await _load(url)
            assert before == EngineLoad(waiting=0, running=0, tokens=35)
            async with http.post(url + FAULT_PATH, json={"wedge": True}) as r:
                assert r.status == 200 and await r.json() == {"wedged": True, "abort_after": None, "http500": False}
            calls = [asyncio.create_task(_complete(http, url, 20)) for _ in range(3)]
            queued = await _until(lambda: _queued(url, 3))
            assert queued == EngineLoad(waiting=3, running=0, tokens=35), queued
            await asyncio.sleep(0.3)   # ~15 model seconds: hundreds of iterations were it not wedged
            assert await _load(url) == queued and not any(c.done() for c in calls)
            async with http.get(url + "/health") as r:
                assert r.status == 200
            for bad in ({"wedge": "yes"}, {"wedge": True, "more": 1}, [True], {}):
                async with http.post(url + FAULT_PATH, json=bad) as r:
                    assert r.status == 400 and "wedge" in (await r.json())["message"]
            assert server.wedged
            async with http.post(url + FAULT_PATH, json={"wedge": False}) as r:
                assert (await r.json())["wedged"] is False
            assert await asyncio.wait_for(asyncio.gather(*calls), 5.0) == [20, 20, 20]
            after = await _load(url)
    finally:
        await runner.cleanup()
    assert after == EngineLoad(waiting=0, running=0, tokens=35 + 3 * 50)


async def _queued(url: str, n: int) -> EngineLoad | None:
    load = await _load(url)
    return load if load.waiting + load.running == n else None


def test_the_fault_environment_variable_is_wedge_at_seconds(monkeypatch, capsys) -> None:
    assert parse_fault_env(None) is None and parse_fault_env("") is None
    assert parse_fault_env("wedge@0") == 0.0 and parse_fault_env("wedge@2.5") == 2.5
    for bad in ("wedge", "wedge@", "wedge@-1", "wedge@nan", "stall@3", "wedge@inf"):
        with pytest.raises(SpecError) as exc:
            parse_fault_env(bad)
        assert "wedge@SECONDS" in str(exc.value) and FAULT_ENV in str(exc.value)
    monkeypatch.setenv(FAULT_ENV, "wedge@soon")
    monkeypatch.setenv(TEST_HOOKS_ENV, "1")
    assert main(["--model", MODEL, "--gpu", "h100-sxm"]) == 2
    assert "wedge@SECONDS" in capsys.readouterr().err


async def test_the_engine_wedges_the_given_seconds_after_it_starts() -> None:
    args = build_arg_parser().parse_args(["--model", MODEL, "--gpu", "h100-sxm", "--time-scale", "0.02"])
    assert build_server(args).wedge_after_s is None   # the environment is read only when given
    server = build_server(args, {FAULT_ENV: "wedge@0.4", TEST_HOOKS_ENV: "1"})
    runner, url = await _serve(server)
    try:
        async with aiohttp.ClientSession(trust_env=False) as http:
            assert await _complete(http, url, 5) == 5 and not server.wedged
            await asyncio.sleep(0.5)
            assert server.wedged
            call = asyncio.create_task(_complete(http, url, 5))
            queued = await _until(lambda: _queued(url, 1))
            await asyncio.sleep(0.2)
            assert queued is not None and queued.tokens == 35 and await _load(url) == queued and not call.done()
            call.cancel()
    finally:
        await runner.cleanup()


VLLM_V1 = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1000.0
vllm:prompt_tokens_created{engine="0",model_name="m"} 1.7e+09
vllm:prompt_tokens_total{engine="1",model_name="m"} 500.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="m"} 70.0
vllm:generation_tokens_total{engine="1",model_name="m"} 30.0
"""
SGLANG = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",tp_rank="0"} 3.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m",tp_rank="0"} 5.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m",tp_rank="0"} 0.4
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="m",tp_rank="0"} 200.0
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="m",tp_rank="0"} 22.0
"""


def test_the_load_is_read_under_vllm_and_sglang_names_summed_over_label_sets() -> None:
    assert parse_load(VLLM_V1) == EngineLoad(waiting=4, running=3, tokens=1600.0)   # no _created series
    assert parse_load(SGLANG) == EngineLoad(waiting=5, running=3, tokens=222.0)
    assert parse_load(SGLANG).busy and not EngineLoad(0, 0, 5.0).busy
    # not an engine's load: no token counter (SGLang without them), no gauge, not Prometheus text at all
    no_tokens = "\n".join(ln for ln in SGLANG.splitlines() if "tokens" not in ln)
    assert parse_load(no_tokens) is None
    assert parse_load("# TYPE vllm:prompt_tokens counter\nvllm:prompt_tokens_total 3\n") is None
    assert parse_load("<html>not metrics</html>") is None and parse_load("") is None


def test_an_unreadable_metrics_page_is_no_load_and_a_silent_one_holds_the_reader_only_its_timeout() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert scrape_load(f"http://127.0.0.1:{port}") is None   # nothing listens
    with socket.socket() as silent:   # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        t0 = time.monotonic()
        assert scrape_load(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.3) is None
        assert time.monotonic() - t0 < 1.0
