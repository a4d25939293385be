"""Router: least outstanding, round-robin ties, one FIFO per LLM when full, reloads, down replicas."""

from __future__ import annotations

import asyncio
import time

import pytest

from scepsy_hpc.gateway.endpoints import Endpoints
from scepsy_hpc.gateway.routing import Hold, NoReplicaError, Router

# gateway scenarios take well under a second: a hang fails here instead of blocking the suite
pytestmark = pytest.mark.timeout(10)


def _eps(replicas: dict[str, list[str]], cap: int = 256) -> Endpoints:
    return Endpoints.model_validate({"llms": {n: {"max_outstanding": cap, "replicas": urls} for n, urls in replicas.items()}})


URLS = ["http://r0:1", "http://r1:1", "http://r2:1"]


async def test_least_outstanding_then_round_robin_on_ties() -> None:
    router = Router(_eps({"a": URLS}))
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    got = [await router.acquire(pool) for _ in range(3)]
    assert [r.url for r in got] == URLS  # each new call goes to an idle replica
    router.release(got[1])
    nxt = await router.acquire(pool)
    assert nxt.url == URLS[1]  # the only replica with fewer outstanding calls
    for r in (*got[:1], nxt, got[2]):
        router.release(r)
    order = []
    for _ in range(6):  # all idle: ties go round-robin
        r = await router.acquire(pool)
        order.append(r.url)
        router.release(r)
    assert order == [URLS[2], URLS[0], URLS[1], URLS[2], URLS[0], URLS[1]]
    assert all(r.outstanding == 0 for r in pool.replicas)


async def test_fifo_when_every_replica_is_full() -> None:
    router = Router(_eps({"a": URLS[:2]}, cap=1))
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    held = [await router.acquire(pool), await router.acquire(pool)]
    waiters = [asyncio.create_task(router.acquire(pool)) for _ in range(3)]
    await asyncio.sleep(0)  # let the three calls queue
    assert pool.queue_length() == 3 and not any(w.done() for w in waiters)
    router.release(held[1])  # r1 frees a slot: the first waiter takes it
    first = await waiters[0]
    assert first.url == URLS[1] and not waiters[1].done()
    router.release(held[0])
    second = await waiters[1]
    assert second.url == URLS[0] and not waiters[2].done()
    router.release(first)
    assert (await waiters[2]).url == URLS[1]
    assert pool.queue_length() == 0


async def test_new_calls_do_not_overtake_queued_ones() -> None:
    router = Router(_eps({"a": URLS[:1]}, cap=1))
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    held = await router.acquire(pool)
    early = asyncio.create_task(router.acquire(pool))
    await asyncio.sleep(0)
    router.release(held)  # hands the slot to `early` at once
    late = asyncio.create_task(router.acquire(pool))
    await asyncio.sleep(0)
    assert early.done() and not late.done()
    router.release(early.result())
    assert (await late).url == URLS[0]


async def test_cancelled_waiter_leaves_queue_without_leaking_a_slot() -> None:
    router = Router(_eps({"a": URLS[:1]}, cap=1))
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    held = await router.acquire(pool)
    gone = asyncio.create_task(router.acquire(pool))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert pool.queue_length() == 0
    router.release(held)
    assert pool.replicas[0].outstanding == 0
    assert (await router.acquire(pool)).outstanding == 1


async def test_removed_replica_gets_no_new_calls_and_inflight_finishes() -> None:
    router = Router(_eps({"a": URLS[:2]}))
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    r0 = await router.acquire(pool)
    assert r0.url == URLS[0]
    router.apply(_eps({"a": [URLS[1], URLS[2]]}))
    picked = {(await router.acquire(pool)).url for _ in range(4)}
    assert picked == {URLS[1], URLS[2]}
    assert not r0.active and r0.outstanding == 1
    router.release(r0)  # the in-flight call on the removed replica completes normally
    assert r0.outstanding == 0
    router.apply(_eps({"a": URLS}))  # re-added: a fresh state
    assert [r.url for r in pool.replicas] == URLS and pool.replicas[0].outstanding == 0


async def test_reload_keeps_outstanding_of_kept_replicas() -> None:
    router = Router(_eps({"a": URLS[:1]}, cap=1))
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    held = await router.acquire(pool)
    waiter = asyncio.create_task(router.acquire(pool))
    await asyncio.sleep(0)
    router.apply(_eps({"a": URLS[:2]}, cap=1))  # a new replica: the queued call goes there at once
    assert (await waiter).url == URLS[1]
    assert held.outstanding == 1 and pool.replicas[0] is held


async def test_removed_llm_fails_its_queued_calls() -> None:
    router = Router(_eps({"a": URLS[:1], "b": URLS[1:2]}, cap=1))
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    await router.acquire(pool)
    waiter = asyncio.create_task(router.acquire(pool))
    await asyncio.sleep(0)
    router.apply(_eps({"b": URLS[1:2]}))
    with pytest.raises(NoReplicaError) as info:
        await waiter
    assert "removed from the endpoints file" in info.value.message
    assert router.names() == ["b"]


async def test_no_replicas_and_exhausted_failover() -> None:
    router = Router(_eps({"a": [], "b": URLS[:1]}))
    router.sync()
    pool_a, pool_b = router.pool("a"), router.pool("b")
    assert pool_a is not None and pool_b is not None
    with pytest.raises(NoReplicaError) as info:
        await router.acquire(pool_a)
    assert "has no replicas" in info.value.message and not info.value.exhausted
    with pytest.raises(NoReplicaError) as info2:
        await router.acquire(pool_b, frozenset(URLS[:1]))
    assert info2.value.exhausted


async def test_down_replica_is_a_last_resort() -> None:
    router = Router(_eps({"a": URLS[:2]}), down_for_s=3600)
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    router.mark_down(pool.replicas[0])
    got = [await router.acquire(pool) for _ in range(3)]
    assert [r.url for r in got] == [URLS[1]] * 3  # r0 is idle but refused connections a moment ago
    router.mark_up(pool.replicas[0])
    assert (await router.acquire(pool)).url == URLS[0]


async def test_aliases_name_the_same_pool_and_follow_reloads() -> None:
    def eps(alias_of: str) -> Endpoints:
        return Endpoints.model_validate({"llms": {
            "d/a": {"replicas": URLS[:1], "aliases": ["x"] if alias_of == "d/a" else []},
            "d/b": {"replicas": URLS[1:2], "aliases": ["x"] if alias_of == "d/b" else []}}})

    router = Router(eps("d/a"))
    router.sync()
    pool_a = router.pool("d/a")
    assert router.pool("x") is pool_a and router.names() == ["d/a", "d/b"]
    held = await router.acquire(router.pool("x"))  # a call by alias counts against the key's pool
    assert held.url == URLS[0] and sum(r.outstanding for r in pool_a.replicas) == 1
    router.apply(eps("d/b"))
    assert router.pool("x") is router.pool("d/b") and router.pool("d/a") is pool_a
    assert router.accepted_names() == {"d/a": "d/a", "d/b": "d/b", "x": "d/b"}
    router.release(held)
    assert held.outstanding == 0


async def test_a_held_call_goes_when_a_replica_appears() -> None:
    router = Router(_eps({"a": []}))
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    call = asyncio.create_task(router.acquire(pool, hold=Hold(5.0)))
    await asyncio.sleep(0)
    assert not call.done() and pool.held_count() == 1 and pool.queue_length() == 0
    router.apply(_eps({"a": URLS[:1]}))
    assert (await call).url == URLS[0]
    assert pool.held_count() == 0 and router.held_calls == {"a": 1} and router.hold_timeouts == {}


async def test_a_hold_runs_out_with_a_message_naming_the_wait() -> None:
    router = Router(_eps({"a": []}))
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    t0 = time.monotonic()
    with pytest.raises(NoReplicaError) as info:
        await router.acquire(pool, hold=Hold(0.05))
    assert time.monotonic() - t0 >= 0.05
    assert info.value.message == "waited 0.05 s for a replica of llm 'a'; the endpoints file lists none"
    assert info.value.held_s == 0.05 and pool.held_count() == 0 and not pool.waiters
    assert router.hold_timeouts == {"a": 1}
    with pytest.raises(NoReplicaError) as at_once:   # no hold: the old answer, at once
        await router.acquire(pool)
    assert "has no replicas" in at_once.value.message


async def test_a_removed_llm_fails_its_held_calls_at_once() -> None:
    router = Router(_eps({"a": [], "b": URLS[:1]}))
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    call = asyncio.create_task(router.acquire(pool, hold=Hold(30.0)))
    await asyncio.sleep(0)
    router.apply(_eps({"b": URLS[:1]}))
    with pytest.raises(NoReplicaError) as info:
        await call
    assert "removed from the endpoints file" in info.value.message
    with pytest.raises(NoReplicaError):   # a retry of a call of the removed LLM does not hold either
        await router.acquire(pool, hold=Hold(30.0))


async def test_a_retry_after_a_refusal_waits_for_the_down_period_then_takes_the_same_replica() -> None:
    router = Router(_eps({"a": URLS[:1]}), down_for_s=0.05)
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    hold = Hold(5.0)
    r = await router.acquire(pool, hold=hold)
    router.release(r)
    router.mark_down(r)   # the connection was refused
    t0 = time.monotonic()
    again = await router.acquire(pool, avoid_down=True, hold=hold)
    assert again is r and time.monotonic() - t0 >= 0.04   # the same URL, once its down period passed
    assert router.held_calls == {"a": 1} and hold.since is not None


async def test_the_hold_clock_does_not_restart_between_retries() -> None:
    router = Router(_eps({"a": URLS[:1]}), down_for_s=0.03)
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    hold = Hold(0.1)
    t0 = time.monotonic()
    with pytest.raises(NoReplicaError) as info:
        while True:   # a replica that refuses every connection
            r = await router.acquire(pool, avoid_down=True, hold=hold)
            router.release(r)
            router.mark_down(r)
    assert 0.1 <= time.monotonic() - t0 < 1.0
    assert info.value.message == "waited 0.1 s for a replica of llm 'a'; every replica refused connections"
    assert 2 <= pool.replicas[0].connect_failures <= 5   # retried after each down period, not in a hot loop


async def test_a_retry_prefers_another_replica_that_is_up_and_mark_up_wakes_held_calls() -> None:
    router = Router(_eps({"a": URLS[:2]}), down_for_s=3600)
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    r0, r1 = pool.replicas
    router.mark_down(r0)
    assert (await router.acquire(pool, avoid_down=True, hold=Hold(5.0))) is r1
    router.release(r1)
    router.mark_down(r1)
    call = asyncio.create_task(router.acquire(pool, avoid_down=True, hold=Hold(5.0)))
    await asyncio.sleep(0)
    assert not call.done() and pool.held_count() == 1
    router.mark_up(r1)   # another call got through to r1: the held one goes at once
    assert (await call) is r1


async def test_a_cancelled_held_call_leaves_nothing_behind() -> None:
    router = Router(_eps({"a": []}))
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    call = asyncio.create_task(router.acquire(pool, hold=Hold(5.0)))
    await asyncio.sleep(0)
    (w,) = pool.waiters
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not pool.waiters and w.timer is None


async def test_draining_lists_removed_replicas_until_their_calls_end() -> None:
    router = Router(_eps({"a": URLS[:2]}))
    router.sync()
    pool = router.pool("a")
    assert pool is not None
    r0 = await router.acquire(pool)
    router.apply(_eps({"a": URLS[1:2]}))
    assert router.draining() == [r0]
    assert [(r.url, r.active) for r in router.replica_states(pool)] == [(URLS[1], True), (URLS[0], False)]
    router.release(r0)
    assert router.draining() == [] and [r.url for r in router.replica_states(pool)] == [URLS[1]]
