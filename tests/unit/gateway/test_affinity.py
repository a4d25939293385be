"""Prefix affinity in the router: a request's calls go back to its replica within the slack."""

from __future__ import annotations

import pytest

from scepsy_hpc.gateway.endpoints import Endpoints
from scepsy_hpc.gateway.routing import Router

pytestmark = pytest.mark.timeout(15)

A, B = "http://a:1", "http://b:1"


def _eps(urls: list[str]) -> Endpoints:
    return Endpoints.model_validate({"llms": {"m": {"max_outstanding": 8, "replicas": urls}}})


async def test_a_request_returns_to_its_replica_within_the_slack() -> None:
    r = Router(_eps([A, B]), affinity=True, affinity_slack=1)
    r.sync()
    pool = r.pool("m")
    assert pool is not None
    first = await r.acquire(pool, request="R")
    r.release(first)
    other = await r.acquire(pool, request="X")     # round-robin would now give R the other replica
    assert other.url != first.url
    again = await r.acquire(pool, request="R")     # its replica has 0 outstanding, the other 1: stays
    assert again.url == first.url
    more = await r.acquire(pool, request="R")      # its replica 1, the other 1: within slack, stays (2 now)
    assert more.url == first.url
    # its replica has 2 outstanding, the other 1: 2 <= 1 + 1, stays; at 3 vs 1 it moves
    assert (await r.acquire(pool, request="R")).url == first.url
    moved = await r.acquire(pool, request="R")
    assert moved.url == other.url and r.affinity_hits == 3 and r.affinity_misses == 1
    assert (await r.acquire(pool, request="R")).url == other.url   # and the affinity moved with it


async def test_without_affinity_or_request_it_is_least_outstanding() -> None:
    r = Router(_eps([A, B]), affinity=False)
    r.sync()
    pool = r.pool("m")
    assert pool is not None
    x = await r.acquire(pool, request="R")
    r.release(x)
    y = await r.acquire(pool, request="R")
    assert y.url != x.url and r.affinity_size() == 0


async def test_slack_zero_and_a_tuned_slack() -> None:
    for slack, want_stay in ((0, False), (2, True)):
        r = Router(_eps([A, B]), affinity=True, affinity_slack=slack)
        r.sync()
        pool = r.pool("m")
        assert pool is not None
        home = await r.acquire(pool, request="R")
        nxt = await r.acquire(pool, request="R")   # home has 1, the other 0
        assert (nxt.url == home.url) is want_stay
    with pytest.raises(ValueError, match="affinity_slack"):
        Router(_eps([A]), affinity=True, affinity_slack=-1)


async def test_the_table_is_bounded_and_forgets_a_replica_that_leaves() -> None:
    r = Router(_eps([A, B]), affinity=True, max_affinity=50)
    r.sync()
    pool = r.pool("m")
    assert pool is not None
    for i in range(200):
        r.release(await r.acquire(pool, request=f"r{i}"))
    assert r.affinity_size() == 50
    r.apply(_eps([B]))   # A leaves: its requests' entries go
    assert set(r._affinity.values()) == {B}
    r.forget("r199")
    assert ("m", "r199") not in r._affinity
