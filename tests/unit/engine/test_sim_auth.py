"""The sim engine's secret (/v1 and /scepsy need it, /health and /metrics stay open, never on the command line),
its test hooks (off unless started for tests) and its engine-level faults."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from scepsy_hpc.engine.local import SimEngineSpec, sim_engines
from scepsy_hpc.engine.sim_server import FAULT_ENV, FAULT_PATH, TEST_HOOKS_ENV, SimEngineServer, build_arg_parser, \
    build_server
from scepsy_hpc.perf.model import EngineConfig, EnginePerf

pytestmark = pytest.mark.timeout(30)

MODEL = "llama-3.2-1b-instruct"
SECRET = "s3cret-engine-key-0123456789"
BODY = {"prompt": [1] * 10, "max_tokens": 4}


def _call(url: str, path: str, *, body: object = None, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"text": raw.decode(errors="replace")}


def test_an_engine_with_a_secret_answers_v1_only_to_it_and_hooks_are_off(tmp_path: Path) -> None:
    spec = SimEngineSpec(MODEL, "h100-sxm", served_model_name="m", api_key=SECRET)
    assert SECRET not in repr(spec)
    with sim_engines([spec], 0.02, tmp_path) as (eng,):
        url, auth = eng.url, {"Authorization": f"Bearer {SECRET}"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET},
                        {"Authorization": f"Basic {SECRET}"}, {"Authorization": f"Bearer {SECRET}x"}):
            status, doc = _call(url, "/v1/completions", body=BODY, headers=headers)
            assert status == 401 and doc["type"] == "AuthenticationError" and "Bearer" in doc["message"], (headers, doc)
            assert _call(url, "/v1/models", headers=headers)[0] == 401
        status, doc = _call(url, "/v1/completions", body=BODY, headers=auth)
        assert status == 200 and doc["usage"]["completion_tokens"] == 4
        assert _call(url, "/v1/models", headers={"Authorization": f"bearer {SECRET}"})[0] == 200
        # open as vLLM leaves them: the agent's probes and Prometheus need no secret
        for path in ("/health", "/metrics"):
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url + path, timeout=5) as r:
                assert r.status == 200
        # /scepsy is guarded too; without test hooks the fault route does not exist, the header is refused
        assert _call(url, FAULT_PATH, body={"wedge": True})[0] == 401
        assert _call(url, FAULT_PATH, body={"wedge": True}, headers=auth)[0] == 404
        status, doc = _call(url, "/v1/completions", body=BODY, headers={**auth, "X-Sim-Fault": "http500"})
        assert status == 400 and "--test-hooks" in doc["message"] and TEST_HOOKS_ENV in doc["message"]
        # the secret is in the engine's environment, never on its command line (what `ps` shows every user)
        cmdline = Path(f"/proc/{eng.process.pid}/cmdline").read_bytes()
        assert SECRET.encode() not in cmdline and b"--test-hooks" not in cmdline
        assert SECRET not in eng.log_tail(50)


def test_without_a_secret_the_engine_needs_none_and_its_environment_does_not_leak_one(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    monkeypatch.setenv("SCEPSY_ENGINE_API_KEY", "inherited")
    monkeypatch.setenv(TEST_HOOKS_ENV, "1")
    with sim_engines([SimEngineSpec(MODEL, "h100-sxm", served_model_name="m")], 0.02, tmp_path) as (eng,):
        assert _call(eng.url, "/v1/completions", body=BODY)[0] == 200
        assert _call(eng.url, FAULT_PATH, body={"wedge": True})[0] == 404   # the inherited hooks switch is dropped


def test_the_fault_environment_is_ignored_with_a_line_without_test_hooks(capsys) -> None:
    args = build_arg_parser().parse_args(["--model", MODEL, "--gpu", "h100-sxm"])
    server = build_server(args, {FAULT_ENV: "wedge@0"})
    assert server.wedge_after_s is None and not server.test_hooks
    assert f"{FAULT_ENV}='wedge@0' ignored" in capsys.readouterr().err
    assert build_server(args, {FAULT_ENV: "wedge@0", TEST_HOOKS_ENV: "1"}).wedge_after_s == 0.0
    hooked = build_arg_parser().parse_args(["--model", MODEL, "--gpu", "h100-sxm", "--test-hooks"])
    assert build_server(hooked, {FAULT_ENV: "wedge@1"}).wedge_after_s == 1.0
    assert build_server(args, {"SCEPSY_ENGINE_API_KEY": SECRET})._api_key == SECRET.encode()


async def test_engine_level_faults_abort_every_call_or_answer_500_until_cleared(models, gpus) -> None:
    server = SimEngineServer(EnginePerf(EngineConfig(models[MODEL], gpus["h100-sxm"])), served_name="m",
                             time_scale=0.02, max_model_len=4096, test_hooks=True)
    runner = web.AppRunner(server.make_app(), access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession(trust_env=False) as http:
            async def fault(body: object) -> tuple[int, dict]:
                async with http.post(url + FAULT_PATH, json=body) as r:
                    return r.status, await r.json()

            assert await fault({"abort_after": 2}) == (200, {"wedged": False, "abort_after": 2, "http500": False})
            lines = []
            with pytest.raises(aiohttp.ClientPayloadError):
                async with http.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 8, "stream": True}) as r:
                    async for line in r.content:
                        lines.append(line)
            assert sum(ln.startswith(b"data: {") for ln in lines) == 2 and b"data: [DONE]\n" not in lines
            with pytest.raises(aiohttp.ServerDisconnectedError):
                async with http.post(f"{url}/v1/completions", json=BODY) as r:
                    await r.read()
            # a call's own header wins over the engine-level fault
            lines = []
            with pytest.raises(aiohttp.ClientPayloadError):
                async with http.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 8, "stream": True},
                                     headers={"X-Sim-Fault": "abort-after:1"}) as r:
                    async for line in r.content:
                        lines.append(line)
            assert sum(ln.startswith(b"data: {") for ln in lines) == 1
            assert (await fault({"abort_after": None, "http500": True}))[1] == {
                "wedged": False, "abort_after": None, "http500": True}
            async with http.post(f"{url}/v1/completions", json=BODY) as r:
                assert r.status == 500 and (await r.json())["type"] == "InternalServerError"
            await fault({"http500": False})
            async with http.post(f"{url}/v1/completions", json=BODY) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 4
            for bad in ({"abort_after": -1}, {"abort_after": 1.5}, {"abort_after": True}, {"http500": 1}, {"x": 1}):
                status, doc = await fault(bad)
                assert status == 400 and "abort_after" in doc["message"], bad
            assert server.faults() == {"wedged": False, "abort_after": None, "http500": False}
    finally:
        await runner.cleanup()
