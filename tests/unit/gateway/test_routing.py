"""Router: least outstanding, round-robin ties, one FIFO per LLM when full, reloads, down replicas."""

from __future__ import annotations

import asyncio

import pytest

from scepsy_hpc.gateway.endpoints import Endpoints
from scepsy_hpc.gateway.routing import NoReplicaError, Router

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
