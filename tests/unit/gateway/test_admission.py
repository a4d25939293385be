"""The request cap (gateway/admission.py): at most N workflow requests of a deployment in flight; the rest
wait first come first served, a request's later calls are never held, and the slot of a request goes when
its end is reported or it has been idle `request_idle_s`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from scepsy_hpc.errors import SpecError
from scepsy_hpc.gateway.admission import Admission, Refusal, Ticket
from scepsy_hpc.gateway.endpoints import load_endpoints

pytestmark = pytest.mark.timeout(20)

CHAT = [{"role": "user", "content": "hi"}]


def _gate(cap: int = 2, **kw: float) -> Admission:
    g = Admission(idle_s=kw.get("idle_s", 30.0), wait_s=kw.get("wait_s", 30.0))
    g.configure({"d": cap})
    return g


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _in(g: Admission, scope: str | None, rid: str | None) -> Ticket:
    t = await g.enter(scope, rid)
    assert isinstance(t, Ticket), t
    return t


async def _a_in_then_waiting(g: Admission, *rids: str) -> tuple[Ticket, list[asyncio.Task[Ticket | Refusal]]]:
    """Request a admitted in scope d, then a call of each of `rids` waiting behind it."""
    a = await _in(g, "d", "a")
    tasks = [asyncio.create_task(g.enter("d", r)) for r in rids]
    await _settle()
    return a, tasks


async def test_a_third_request_waits_and_takes_the_slot_of_the_first_to_end() -> None:
    g = _gate(2)
    r1, r2 = await _in(g, "d", "r1"), await _in(g, "d", "r2")
    third = asyncio.create_task(g.enter("d", "r3"))
    fourth = asyncio.create_task(g.enter("d", "r4"))
    await _settle()
    assert not third.done() and not fourth.done()
    figs = g.stats()["d"]
    assert (figs["in_flight"], figs["waiting"]) == (2, 2)
    r2b = await _in(g, "d", "r2")   # a request in flight is never held: its next call goes in
    r1.leave()
    r1.leave()                      # a ticket leaves once
    g.end("r1")
    await _settle()
    assert third.done() and isinstance(await third, Ticket) and not fourth.done()   # first come, first served
    r2.leave()
    r2b.leave()
    g.end("r2")
    assert isinstance(await asyncio.wait_for(fourth, 1), Ticket)
    assert g.stats()["d"]["admitted"] == 4 and g.stats()["d"]["waited"] == 2


async def test_calls_of_one_waiting_request_go_in_together() -> None:
    """A fan-out's sibling calls of a request that waits are admitted with it, taking one slot."""
    g = _gate(1)
    a = await _in(g, "d", "a")
    sibs = [asyncio.create_task(g.enter("d", "b")) for _ in range(3)]
    other = asyncio.create_task(g.enter("d", "c"))
    await _settle()
    a.leave()
    g.end("a")
    await _settle()
    assert all(t.done() for t in sibs) and not other.done()
    assert g.stats()["d"]["in_flight"] == 1 and g.stats()["d"]["waiting"] == 1
    tickets = [t.result() for t in sibs]
    tickets[0].leave()
    tickets[1].leave()
    g.end("b")          # reported while one call of it still runs: its slot goes when that call ends
    await _settle()
    assert not other.done()
    tickets[2].leave()
    assert isinstance(await asyncio.wait_for(other, 1), Ticket)


async def test_an_idle_request_ends_and_its_late_call_is_not_held() -> None:
    g = _gate(1, idle_s=0.05)
    (await _in(g, "d", "a")).leave()   # a tool runs, no call in flight
    waiting = asyncio.create_task(g.enter("d", "b"))
    assert isinstance(await asyncio.wait_for(waiting, 2), Ticket)   # a's slot went to b after 0.05 s idle
    assert g.stats()["d"]["idle_ended"] == 1
    # a comes back (its tool took longer than idle_s): admitted at once, over the cap, not behind new ones
    assert isinstance(await asyncio.wait_for(g.enter("d", "a"), 0.5), Ticket)
    assert g.stats()["d"]["readmitted"] == 1 and g.stats()["d"]["in_flight"] == 2


async def test_the_idle_timer_wakes_a_waiter_whose_request_went_idle_after_it_came() -> None:
    """One timer per scope: armed when a call's end leaves a request idle while others wait."""
    g = _gate(1, idle_s=0.05)
    a = await _in(g, "d", "a")
    waiting = asyncio.create_task(g.enter("d", "b"))
    await _settle()
    a.leave()
    assert isinstance(await asyncio.wait_for(waiting, 2), Ticket)


async def test_a_request_waiting_past_wait_s_is_refused_and_leaves_the_queue() -> None:
    g = _gate(1, wait_s=0.1)
    await _in(g, "d", "a")
    refusal = await asyncio.wait_for(g.enter("d", "b"), 2)
    assert isinstance(refusal, Refusal) and "request cap (1 requests in flight)" in refusal.message
    assert "waited 0 s" in refusal.message and refusal.retry_after_s >= 1
    assert g.stats()["d"]["wait_timeouts"] == 1 and g.stats()["d"]["waiting"] == 0


async def test_the_queue_is_bounded_in_requests_and_in_calls() -> None:
    g = _gate(1)
    await _in(g, "d", "a")
    waiters = [asyncio.create_task(g.enter("d", f"w{i}")) for i in range(10)]
    await _settle()
    refusal = await g.enter("d", "one-too-many")
    assert isinstance(refusal, Refusal) and "10 more requests (10 calls) wait" in refusal.message
    # calls of one waiting request: at most 20 per unit of the cap in all
    waiters += [asyncio.create_task(g.enter("d", "w0")) for _ in range(10)]
    await _settle()
    refusal = await g.enter("d", "w0")
    assert isinstance(refusal, Refusal) and "(20 calls) wait" in refusal.message
    assert g.stats()["d"]["queue_full"] == 2
    for t in waiters:
        t.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert g.stats()["d"]["waiting"] == 0   # a client that goes away leaves the queue
    assert g.scopes["d"].waiting_calls == 0


async def test_a_grant_whose_calls_all_went_away_frees_its_slot_at_once() -> None:
    g = _gate(1)
    a, (gone, nxt) = await _a_in_then_waiting(g, "w", "c")
    a.leave()
    g.end("a")          # w is granted ...
    gone.cancel()       # ... and its client leaves in the same turn, before its call runs
    await asyncio.gather(gone, return_exceptions=True)
    assert isinstance(await asyncio.wait_for(nxt, 1), Ticket)   # c does not wait idle_s for w's slot
    assert "w" not in g.scopes["d"].active


async def test_caps_follow_the_file_raised_removed_and_uncapped_scopes() -> None:
    g = _gate(1)
    a, (b, c) = await _a_in_then_waiting(g, "b", "c")
    g.configure({"d": 2})        # raised: one more goes in now
    await _settle()
    assert b.done() and not c.done()
    g.configure({})              # removed: everyone goes
    assert isinstance(await asyncio.wait_for(c, 1), Ticket)
    g.configure({"d": 1})        # and back: the old calls' ends do not count against the new scope
    n = await _in(g, "d", "a")
    a.leave()
    assert g.stats()["d"]["in_flight"] == 1 and g.scopes["d"].active["a"].calls == 1
    n.leave()
    assert isinstance(await g.enter("other", "x"), Ticket) and "other" not in g.stats()
    g.configure({None: 1})
    await _in(g, None, None)
    await _in(g, None, None)     # no request id: not counted
    assert g.uncapped_calls == 2


async def test_an_end_reported_for_another_deployment_frees_nothing() -> None:
    g = Admission()
    g.configure({"a": 1, "b": 1})
    (await _in(g, "a", "r")).leave()
    (await _in(g, "b", "r")).leave()
    g.end("r", allowed=lambda scope: scope == "a")
    assert g.stats()["a"]["in_flight"] == 0 and g.stats()["b"]["in_flight"] == 1


def test_bad_times_refused() -> None:
    with pytest.raises(ValueError, match="finite and > 0"):
        Admission(idle_s=0)
    with pytest.raises(ValueError, match="finite and > 0"):
        Admission(wait_s=float("inf"))


def _file(tmp_path: Path, head: str) -> Path:
    p = tmp_path / "endpoints.yaml"
    p.write_text(head + "llms:\n  a/x:\n    replicas: [http://127.0.0.1:1]\n  b/y:\n    deployment: b\n"
                 "    replicas: [http://127.0.0.1:2]\n")
    return p


def test_the_endpoints_file_names_a_cap_for_a_deployment_it_does_not_serve(tmp_path: Path) -> None:
    ok = load_endpoints(_file(tmp_path, "max_requests: {a: 5, b: 7}\nrequest_idle_s: 30\n"))
    assert ok.request_caps() == {"a": 5, "b": 7} and ok.request_idle_s == 30
    with pytest.raises(SpecError, match=r"endpoints.yaml:1: max_requests: no LLM here belongs to deployment 'c' "
                                        r"\(the LLMs' deployments: a, b\)"):
        load_endpoints(_file(tmp_path, "max_requests: {c: 5}\n"))
    with pytest.raises(SpecError, match=r"endpoints.yaml:1: max_requests: a bare number caps the LLMs with no "
                                        r"deployment, and every LLM here has one"):
        load_endpoints(_file(tmp_path, "max_requests: 5\n"))
    for bad in ("0", "yes", "'5'", "{a: true}"):   # no YAML boolean or string taken for a number
        with pytest.raises(SpecError, match="max_requests"):
            load_endpoints(_file(tmp_path, f"max_requests: {bad}\n"))
    with pytest.raises(SpecError, match="request_wait_s"):
        load_endpoints(_file(tmp_path, "request_wait_s: -1\n"))


async def test_the_gateway_holds_the_third_request_until_the_first_ends(stack: Any) -> None:
    """Real HTTP: two requests reach the engine, a third waits at the gateway; the first's reported end lets
    it in; calls with no request id and calls to an uncapped deployment pass."""
    async with stack({"a/x": 1, "b/y": 1}) as s:
        text = s.endpoints_path.read_text()
        s.write_endpoints("max_requests: {a: 2}\n" + text)
        eng = s.engines["a/x"][0]
        eng.gate.clear()

        def call(rid: str | None, model: str = "a/x") -> asyncio.Task[tuple[int, Any]]:
            return asyncio.create_task(s.post("/v1/chat/completions", {"model": model, "messages": CHAT},
                                              headers={"X-Scepsy-Request": rid} if rid else None))

        assert (await s.post("/scepsy/v1/spans", {"span": "request", "event": "start", "request": "r1"}))[0] == 200
        first, second = call("r1"), call("r2")
        await eng.wait_calls(2)
        third = call("r3")
        st = s.gw.state
        await s.until(lambda: st.admission.stats()["a"]["waiting"] == 1)
        free = call(None)                       # no request id: not capped
        other = call("r9", "b/y")               # deployment b has no cap
        await eng.wait_calls(3)
        assert (await other)[0] == 200
        assert len(eng.calls) == 3   # r1, r2 and the call with no id; r3 waits
        status, stats = await s.post("/scepsy/v1/spans", {"span": "request", "event": "end", "request": "r1"})
        assert status == 200
        _, body = await s.get("/scepsy/v1/stats")
        eng.gate.set()
        results = await asyncio.gather(first, second, third, free)
        _, metrics = await s.get("/metrics")
        trace = await s.close_gateway()
    assert [r[0] for r in results] == [200] * 4
    assert '"requests": {"a": {"max_requests": 2, "in_flight": 2, "waiting": 1' in body
    assert '"uncapped_calls": 1' in body
    calls = {c.request: c for c in trace.calls if c.llm == "a/x"}
    assert calls["r3"].t_start >= calls["r1"].t_end > calls["r2"].t_start   # r3 went in when r1 ended
    assert 'scepsy_gateway_max_requests{deployment="a"} 2.0' in metrics
    assert 'scepsy_gateway_requests_waited_total{deployment="a"} 1.0' in metrics


async def _one_in_flight(s: Any, head: str) -> tuple[Any, asyncio.Task[tuple[int, Any]]]:
    """`head` put before the stack's endpoints file; request r1's call held at the engine (its gate closed)."""
    s.write_endpoints(head + s.endpoints_path.read_text())
    eng = s.engines["x"][0]
    eng.gate.clear()
    first = asyncio.create_task(s.post("/v1/chat/completions", {"model": "x", "messages": CHAT},
                                       headers={"X-Scepsy-Request": "r1"}))
    await eng.wait_calls(1)
    return eng, first


async def test_a_request_held_past_its_wait_gets_a_503_with_retry_after(stack: Any) -> None:
    async with stack({"x": 1}) as s:
        eng, first = await _one_in_flight(s, "max_requests: 1\nrequest_wait_s: 0.2\n")
        assert s.http is not None
        async with s.http.post(s.url + "/r/r2/v1/chat/completions", json={"model": "x", "messages": CHAT}) as r:
            status, retry, err = r.status, r.headers.get("Retry-After"), (await r.json())["error"]
        eng.gate.set()
        assert (await first)[0] == 200
    assert status == 503 and retry is not None and int(retry) >= 1
    assert err["code"] == "request_cap" and "this gateway is at its request cap (1 requests in flight)" in err["message"]


async def test_calls_waiting_at_the_cap_hold_no_slot_of_their_key(stack: Any) -> None:
    """A key with max_concurrent 2, a cap of 1 request: three new requests wait at the cap, and the admitted
    request's second call still goes in (had the waiting calls kept their key slots it would get a 429)."""
    from tests.unit.gateway.test_auth import KEY_A, auth_section, bearer

    async with stack({"a/x": 1}) as s:
        base = s.endpoints_path.read_text()
        s.write_endpoints("max_requests: {a: 1}\n" + base + auth_section(("ka", KEY_A, ["a"], {"max_concurrent": 2})))
        eng = s.engines["a/x"][0]
        eng.gate.clear()

        def call(rid: str) -> asyncio.Task[tuple[int, Any]]:
            return asyncio.create_task(s.post("/v1/chat/completions", {"model": "a/x", "messages": CHAT},
                                              headers={"X-Scepsy-Request": rid, **bearer(KEY_A)}))

        first = call("r1")
        await eng.wait_calls(1)
        st = s.gw.state
        waiting = []
        for i in range(3):   # one after another: a call holds its key slot until it reaches the cap
            waiting.append(call(f"w{i}"))
            await s.until(lambda: st.admission.stats()["a"]["waiting"] == i + 1)
        assert st.keys.uses["ka"].in_flight == 1
        second = call("r1")                    # the admitted request calls again
        await eng.wait_calls(2)
        eng.gate.set()
        status = [r[0] for r in await asyncio.gather(first, second)]
        for t in waiting:   # each goes in once the one before it idles out; not needed here
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    assert status == [200, 200]
    assert st.keys.uses["ka"].rate_limited == {}


async def test_a_call_whose_client_left_while_it_waited_is_not_sent(stack: Any) -> None:
    """aiohttp does not cancel a handler whose client disconnects: a call let in after its client gave up must
    not reach the engine (nor hold its request's slot)."""
    import aiohttp

    async with stack({"x": 1}) as s:
        eng, first = await _one_in_flight(s, "max_requests: 1\n")
        st = s.gw.state
        assert s.http is not None
        with pytest.raises((asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
            async with s.http.post(s.url + "/r/r2/v1/chat/completions", json={"model": "x", "messages": CHAT},
                                   timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                await r.read()
        assert st.admission.stats()[""]["waiting"] == 1   # its call still waits at the gateway
        assert (await s.post("/scepsy/v1/spans", {"span": "request", "event": "end", "request": "r1"}))[0] == 400
        eng.gate.set()     # r1's call ends; its reported end (no start on record: a 400) freed the slot anyway
        assert (await first)[0] == 200
        await s.until(lambda: st.admission.stats()[""]["waiting"] == 0)
        await asyncio.sleep(0.2)
        third = await asyncio.wait_for(s.post("/v1/chat/completions", {"model": "x", "messages": CHAT},
                                              headers={"X-Scepsy-Request": "r3"}), 5)
    assert third[0] == 200   # r2 holds no slot: r3 goes in at once
    assert len(eng.calls) == 2   # r1 and r3: r2 never reached the engine
