"""The steady load generator: through the real gateway over in-process sim engines, every call counted exactly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from scepsy_hpc.drive.steady import CallRecord, SteadyLoad, gaps, main, summary, window
from scepsy_hpc.engine.sim_server import SimEngineServer
from scepsy_hpc.gateway import start_gateway
from scepsy_hpc.perf.model import EngineConfig, EnginePerf

pytestmark = pytest.mark.timeout(20)

SERVED = "llama-3.2-1b-instruct"
SCALE = 0.001  # 1000x faster than the modelled H100: a 16-token call lasts well under a millisecond of model work
ROOT = Path(__file__).resolve().parents[3]


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def gateway(models, gpus, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A gateway serving LLMs `a` and `b`, each on the same two in-process sim engines; yields its /v1 base URL."""
    async with _gateway_over(models, gpus, tmp_path, faulty=False) as url:
        yield url


@pytest.fixture
async def faulty_gateway(models, gpus, tmp_path: Path):  # type: ignore[no-untyped-def]
    """As `gateway`, plus LLMs `fa` and `fb` on two more engines that close every connection after 3 output
    tokens (the engines' own fault hook: the gateway never forwards a client's `X-Sim-Fault`)."""
    async with _gateway_over(models, gpus, tmp_path, faulty=True) as url:
        yield url


@contextlib.asynccontextmanager
async def _gateway_over(models, gpus, tmp_path: Path, *, faulty: bool):  # type: ignore[no-untyped-def]
    runners, urls = [], []
    for seed in range(4 if faulty else 2):
        perf = EnginePerf(EngineConfig(models[SERVED], gpus["h100-sxm"]))
        server = SimEngineServer(perf, served_name=SERVED, time_scale=SCALE, max_model_len=4096, seed=seed,
                                 test_hooks=faulty)
        runner, url = await _serve(server.make_app())
        runners.append(runner)
        urls.append(url)
    try:
        for url in urls[2:]:
            async with aiohttp.ClientSession() as http:
                async with http.post(url + "/scepsy/sim/fault", json={"abort_after": 3}) as r:
                    assert r.status == 200, await r.text()
        ep = tmp_path / "endpoints.yaml"
        pools = {"a": urls[:2], "b": urls[:2], **({"fa": urls[2:], "fb": urls[2:]} if faulty else {})}
        ep.write_text(f"time_scale: {SCALE}\nllms:\n" + "".join(
            f"  {name}:\n    served_model: {SERVED}\n    replicas:\n" + "".join(f"      - {u}\n" for u in reps)
            for name, reps in pools.items()))
        gw = await start_gateway(ep, None, watch_interval_s=0.0, shutdown_timeout_s=1.0)
        try:
            yield gw.url + "/v1"
        finally:
            await gw.close()
    finally:
        for r in runners:
            await r.cleanup()


def _reasons(records: list[CallRecord]) -> dict[str, int]:
    return summary(records)["failures"]


async def test_every_call_is_ok_through_a_healthy_gateway_streamed_or_not(gateway: str) -> None:
    load = SteadyLoad(gateway, ["a", "b"], 100.0, stream_share=0.5, max_tokens=8)
    records = await load.run(1.0)
    s = summary(records)
    assert s["failures"] == {} and s["ok"] == s["sent"] == 100 == load.due
    # evenly spaced: call k at k/100 s, round-robin, every other round streamed
    assert [r.model for r in records[:4]] == ["a", "b", "a", "b"]
    assert [r.streamed for r in records[:4]] == [False, False, True, True]
    assert s["streamed"] == 50 and sum(r.streamed for r in records if r.model == "a") == 25
    assert all(abs(r.t_send - i / 100) < 0.1 for i, r in enumerate(records))
    assert all(r.status == 200 and r.t_first_byte is not None and r.t_send <= r.t_first_byte <= r.t_end
               for r in records)
    assert 0 < s["p50_s"] <= s["p99_s"] <= s["max_s"] < 1.0
    assert load.in_flight == 0


async def test_aborted_streams_and_answers_are_counted_exactly_beside_a_healthy_load(faulty_gateway: str) -> None:
    # The sim engine closes the connection after 3 of 16 tokens: a stream is cut after it began (the
    # gateway sends an error event and no [DONE]); an unstreamed answer is cut before any byte reached
    # the client, so the gateway retries it on the other replica, which cuts it too: 502.
    faulty = SteadyLoad(faulty_gateway, ["fa", "fb"], 50.0)
    healthy = SteadyLoad(faulty_gateway, ["a", "b"], 50.0)
    bad, good = await asyncio.gather(faulty.run(1.0), healthy.run(1.0))
    n_streamed = sum(r.streamed for r in bad)
    assert len(bad) == 50 and n_streamed == 24
    assert _reasons(bad) == {"truncated": 24, "http_502": 26}
    assert all(not r.ok and (r.status == 200) == r.streamed for r in bad)
    assert all("[DONE]" in r.detail for r in bad if r.streamed)
    assert gaps(bad, "fa").length_s == pytest.approx(max(r.t_end for r in bad if r.model == "fa")
                                                    - min(r.t_send for r in bad if r.model == "fa"))
    s = summary(good)
    assert (s["sent"], s["ok"], s["failed"]) == (50, 50, 0)


async def test_a_call_due_while_max_in_flight_are_outstanding_fails_as_overload() -> None:
    gate = asyncio.Event()
    arrived = 0

    async def held(request: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        await gate.wait()
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", held)
    runner, url = await _serve(app)
    try:
        load = SteadyLoad(url + "/v1", ["m"], 100.0, stream_share=0.0, max_in_flight=3)
        task = asyncio.create_task(load.run(0.1))
        while load.due < 10:
            await asyncio.sleep(0.005)
        assert load.in_flight == 3 and not task.done()
        gate.set()
        records = await task
    finally:
        await runner.cleanup()
    assert arrived == 3
    assert [r.ok for r in records] == [True] * 3 + [False] * 7
    assert summary(records)["failures"] == {"overload": 7}
    assert all(r.t_send == r.t_end and r.status is None and "max_in_flight=3" in r.detail for r in records[3:])


async def test_each_kind_of_bad_answer_has_its_reason() -> None:
    ok_body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}]}

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        if model == "http429":
            return web.json_response({"error": {"message": "slow down"}}, status=429)
        if model == "slow":
            await asyncio.sleep(5)
        if not body["stream"]:
            if model == "no-choices":
                return web.json_response({"object": "chat.completion", "choices": []})
            if model == "cut":
                resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "4096"})
                await resp.prepare(request)
                await resp.write(b'{"choices": [')
                assert request.transport is not None
                request.transport.close()
                return resp
            return web.json_response(ok_body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n')
        if model == "cut":
            assert request.transport is not None
            request.transport.close()
            return resp
        if model == "error-then-done":
            await resp.write(b'data: {"error": {"message": "engine died", "code": 500}}\n\n')
        if model != "no-done":
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner, url = await _serve(app)
    try:
        unary = SteadyLoad(url + "/v1", ["ok", "no-choices", "http429", "cut", "slow"], 100.0, stream_share=0.0,
                           timeout_s=0.3)
        streamed = SteadyLoad(url + "/v1", ["ok", "no-done", "error-then-done", "http429", "cut"], 100.0,
                              stream_share=1.0, timeout_s=0.3)
        u, st = await asyncio.gather(unary.run(0.05), streamed.run(0.05))
        refused = await SteadyLoad(_dead_url() + "/v1", ["ok"], 100.0).run(0.01)
    finally:
        await runner.cleanup()
    assert {r.model: r.error for r in u} == {"ok": None, "no-choices": "no_choices", "http429": "http_429",
                                             "cut": "truncated", "slow": "timeout"}
    assert {r.model: r.error for r in st} == {"ok": None, "no-done": "truncated", "error-then-done": "stream_error",
                                              "http429": "http_429", "cut": "truncated"}
    assert all(r.streamed for r in st) and not any(r.streamed for r in u)
    assert "slow down" in next(r.detail for r in u if r.model == "http429")
    assert "engine died" in next(r.detail for r in st if r.model == "error-then-done")
    assert [(r.error, r.status) for r in refused] == [("connect", None)]


async def test_as_a_context_manager_it_runs_until_the_block_ends_and_waits_for_its_calls(gateway: str) -> None:
    async with SteadyLoad(gateway, ["a"], 50.0, stream_share=1.0, max_tokens=64) as load:
        await asyncio.sleep(0.29)  # between the arrivals due at 0.28 and 0.30 s
        t_stop = load.now()
    records = load.records
    assert load.in_flight == 0 and len(records) == load.due and 15 <= len(records) <= 16
    assert all(r.ok and r.streamed for r in records) and max(r.t_send for r in records) < t_stop
    assert await load.stop() == records  # stopping again changes nothing


async def _never_answering() -> tuple[web.AppRunner, str]:
    """A server whose chat endpoint answers only after 10 s: every call of a short test stays in flight."""
    async def never(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response(status=500)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", never)
    return await _serve(app)


async def test_a_cancelled_load_records_its_calls_in_flight_as_cancelled() -> None:
    runner, url = await _never_answering()
    try:
        load = SteadyLoad(url + "/v1", ["m"], 100.0)
        task = asyncio.create_task(load.run(5.0))
        while load.due < 5:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await runner.cleanup()
    records = load.records
    assert len(records) == load.due >= 5 and load.in_flight == 0
    assert summary(records)["failures"] == {"cancelled": len(records)}


async def test_calls_launched_in_the_step_before_the_cancellation_still_end_as_records() -> None:
    """A busy loop makes arrivals late; the late ones launch at once and the load is cancelled before they start."""
    runner, url = await _never_answering()
    try:
        load = SteadyLoad(url + "/v1", ["m"], 200.0)
        task = asyncio.create_task(load.run(5.0))
        # Wait until the arrivals sleep toward a due time still ahead (evenly spaced: call k at k / rps), so
        # their timer is pending, not already fired: were it fired, they would launch the late calls in the
        # iteration before the cancellation's and those calls would start (a flake on a busy machine).
        while load.due < 1 or load.now() >= load.due / load.rps - 0.001:
            await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        # Both timers are overdue after the block below: the arrivals' (due within 1 / rps) wakes first, the
        # cancellation second, so the late calls are launched one step before the load's task sees its
        # cancellation, and it cancels them before their first step.
        loop.call_at(loop.time() + 0.02, task.cancel)
        time.sleep(0.1)
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await runner.cleanup()
    records = load.records
    assert load.due >= 10 and len(records) == load.due and load.in_flight == 0
    assert summary(records)["failures"] == {"cancelled": len(records)}
    assert any(r.detail == "the load was cancelled before the call was sent" for r in records)


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def _rec(t_send: float, latency_s: float, ok: bool = True, model: str = "m", error: str | None = None) -> CallRecord:
    return CallRecord(model, False, t_send, t_send + latency_s / 2, t_send + latency_s, ok, 200 if ok else 502,
                      None if ok else error)


def test_summary_counts_the_window_by_send_time_with_nearest_rank_percentiles() -> None:
    # call i sent at i/100 s and lasting (i+1) ms; every tenth failed, alternately 502 and truncated
    records = [_rec(i / 100, (i + 1) / 1000, ok=i % 10 != 9, error=("http_502", "truncated")[i // 10 % 2])
               for i in range(200)]
    s = summary(records[:100] + [_rec(0.5, 9.0, ok=False, error="overload")])
    ok_lat = sorted((i + 1) / 1000 for i in range(100) if i % 10 != 9)  # 90 values
    assert (s["sent"], s["ok"], s["failed"]) == (101, 90, 11)
    assert s["failures"] == {"http_502": 5, "overload": 1, "truncated": 5}
    assert s["p50_s"] == pytest.approx(ok_lat[44]) == 0.049  # nearest rank: the 45th of 90
    assert s["p99_s"] == pytest.approx(ok_lat[89]) == s["max_s"]  # the 90th (ceil(89.1)), i = 98
    w = summary(records, 0.2, 0.5)
    assert (w["t0"], w["t1"], w["sent"], w["failed"]) == (0.2, 0.5, 30, 3)
    assert len(window(records, 0.2, 0.5)) == 30 and window(records, 0.2, 0.5)[0].t_send == 0.2
    assert len(window(records, 1.95)) == 5 and len(window(records, None, 0.02)) == 2
    assert summary([])["p99_s"] is None and summary([], 1.0, 2.0)["sent"] == 0
    # p99 of 1000 latencies 1..1000 ms is the 990th
    big = [_rec(i, (i + 1) / 1000) for i in range(1000)]
    assert summary(big)["p99_s"] == pytest.approx(0.990) and summary(big)["p50_s"] == pytest.approx(0.500)


def test_gaps_is_the_longest_time_without_a_success_of_that_model() -> None:
    records = [_rec(0.0, 0.1), _rec(0.2, 0.1), _rec(0.4, 0.1, ok=False, error="http_502"),
               _rec(0.6, 0.1, ok=False, error="http_502"), _rec(0.8, 0.5), _rec(1.0, 0.1),
               _rec(0.5, 0.1, model="other"), _rec(2.0, 0.1, ok=False, model="other", error="truncated")]
    g = gaps(records, "m")
    assert (g.model, g.start_s, g.end_s) == ("m", pytest.approx(0.3), pytest.approx(1.1))
    assert g.length_s == pytest.approx(0.8)
    o = gaps(records, "other")
    assert (o.start_s, o.end_s) == (pytest.approx(0.6), pytest.approx(2.1))  # the tail after the last success
    assert gaps(records, "absent").length_s == 0.0
    never = gaps([_rec(1.0, 0.5, ok=False, error="connect")], "m")
    assert (never.start_s, never.end_s) == (1.0, 1.5)


async def test_cli_json_is_one_document_and_the_exit_status_says_whether_any_call_failed(
        gateway: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--url", gateway, "--model", "a", "--model", "b", "--rps", "40", "--duration", "0.25", "--json"]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "scepsy_hpc.drive.steady", *args, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()
    doc = json.loads(out)
    assert (doc["sent"], doc["ok"], doc["failed"], doc["failures"], doc["streamed"]) == (10, 10, 0, {}, 4)
    assert sorted(doc["per_model"]) == ["a", "b"] and doc["per_model"]["a"]["sent"] == 5
    assert doc["rps"] == 40.0 and doc["p99_s"] > 0


async def test_cli_exits_1_on_a_faulty_run_and_names_the_reason(faulty_gateway: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # in process (the gateway lives in this loop); the engines of fa and fb cut every stream after 3 tokens
    args = ["--url", faulty_gateway, "--model", "fa", "--model", "fb", "--rps", "40", "--duration", "0.25",
            "--stream-share", "1"]
    rc = await asyncio.to_thread(main, args)
    text = capsys.readouterr().out
    assert rc == 1 and "0 ok, 10 failed" in text and "truncated 10" in text


def test_cli_refuses_a_rate_that_is_not_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--url", "http://x/v1", "--model", "m", "--rps", "0", "--duration", "1"])
    assert exc.value.code == 2
    assert "--rps: must be a finite number > 0, got 0" in capsys.readouterr().err
