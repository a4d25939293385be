"""Capacity weights: unlike replicas of one LLM (a mixed group) share its calls in proportion to their weights.

The router gives a call to the free replica of least `(outstanding + 1) / weight`; equal weights choose
exactly as least outstanding did; prefix affinity's slack is read in the same terms.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from scepsy_hpc.errors import SpecError
from scepsy_hpc.gateway.endpoints import Endpoints, load_endpoints, write_endpoints
from scepsy_hpc.gateway.routing import ReplicaState, Router

pytestmark = pytest.mark.timeout(10)

H, L, X = "http://heavy:1", "http://light:1", "http://third:1"


def _eps(reps: list[tuple[str, float | None]], cap: int = 1000, caps: dict[str, int] | None = None) -> Endpoints:
    replicas = []
    for url, w in reps:
        r: dict[str, object] = {"url": url}
        if w is not None:
            r["weight"] = w
        if caps and url in caps:
            r["max_outstanding"] = caps[url]
        replicas.append(r)
    return Endpoints.model_validate({"llms": {"m": {"max_outstanding": cap, "replicas": replicas}}})


def _router(eps: Endpoints, **kw: object) -> tuple[Router, object]:
    router = Router(eps, **kw)  # type: ignore[arg-type]
    router.sync()
    pool = router.pool("m")
    assert pool is not None
    return router, pool


def _outstanding(pool: object) -> dict[str, int]:
    return {r.url: r.outstanding for r in pool.replicas}  # type: ignore[attr-defined]


async def test_calls_that_never_end_split_three_to_one_by_weight() -> None:
    router, pool = _router(_eps([(H, 3.0), (L, 1.0)]))
    for _ in range(400):
        await router.acquire(pool)  # type: ignore[arg-type]
    out = _outstanding(pool)
    assert out[H] + out[L] == 400 and 297 <= out[H] <= 303, out   # 3:1 within a call or so
    # the steady state, call by call: each new call keeps the split at 3:1
    for _ in range(8):
        await router.acquire(pool)  # type: ignore[arg-type]
        now = _outstanding(pool)
        assert abs(now[H] - 3 * now[L]) <= 3, now


async def test_only_the_ratio_of_weights_matters() -> None:
    """Scaled weights choose alike (scales that are powers of two, so that exact ties stay ties in floats)."""
    seqs = []
    for scale in (1.0, 0.125, 1024.0):
        router, pool = _router(_eps([(H, 3.0 * scale), (L, 1.0 * scale), (X, 2.0 * scale)]))
        rng = random.Random(7)
        held: list[ReplicaState] = []
        seq = []
        for _ in range(300):
            if held and rng.random() < 0.4:
                router.release(held.pop(rng.randrange(len(held))))
            r = await router.acquire(pool)  # type: ignore[arg-type]
            held.append(r)
            seq.append(r.url)
        seqs.append(seq)
    assert seqs[0] == seqs[1] == seqs[2]
    assert seqs[0].count(H) > seqs[0].count(X) > seqs[0].count(L)


async def test_equal_weights_choose_exactly_as_least_outstanding() -> None:
    """Any equal weight (the file's default 1, or another value for all) gives the choices of the old rule:
    fewest outstanding, round-robin among equals (a reference of it here), through releases, caps and ties."""

    def reference(outstanding: list[int], caps: list[int], rr: int) -> int | None:
        best = None
        for k in range(len(outstanding)):
            i = (rr + k) % len(outstanding)
            if outstanding[i] < caps[i] and (best is None or outstanding[i] < outstanding[best]):
                best = i
        return best

    urls = [H, L, X]
    caps = [5, 3, 8]
    for weight in (None, 1.0, 0.7, 2.5, 1e6):
        router, pool = _router(_eps([(u, weight) for u in urls], caps=dict(zip(urls, caps))))
        rng = random.Random(11)
        held: list[ReplicaState] = []
        outstanding, rr = [0, 0, 0], 0
        for _ in range(500):
            if held and (rng.random() < 0.45 or len(held) == sum(caps)):
                r = held.pop(rng.randrange(len(held)))
                router.release(r)
                outstanding[urls.index(r.url)] -= 1
                continue
            want = reference(outstanding, caps, rr)
            assert want is not None
            got = await router.acquire(pool)  # type: ignore[arg-type]
            assert got.url == urls[want], (weight, outstanding)
            outstanding[want] += 1
            rr = want + 1
            held.append(got)


async def test_a_full_heavy_replica_leaves_the_call_to_the_light_one() -> None:
    router, pool = _router(_eps([(H, 10.0), (L, 1.0)], caps={H: 2}))
    got = [await router.acquire(pool) for _ in range(3)]  # type: ignore[arg-type]
    # H (weight 10) would be the lighter even with 2 calls, but 2 is its cap
    assert [r.url for r in got] == [H, H, L]
    router.release(got[0])
    assert (await router.acquire(pool)).url == H  # type: ignore[arg-type]


async def test_ties_go_round_robin_and_a_down_heavy_replica_is_a_last_resort() -> None:
    router, pool = _router(_eps([(H, 2.0), (L, 2.0)]))
    seq = []
    for _ in range(4):
        r = await router.acquire(pool)  # type: ignore[arg-type]
        seq.append(r.url)
        router.release(r)
    assert seq == [H, L, H, L]
    router2, pool2 = _router(_eps([(H, 100.0), (L, 1.0)]))
    heavy = next(r for r in pool2.replicas if r.url == H)  # type: ignore[attr-defined]
    router2.mark_down(heavy)
    assert [(await router2.acquire(pool2)).url for _ in range(3)] == [L, L, L]  # type: ignore[arg-type]


async def test_affinity_slack_is_read_in_normalised_load() -> None:
    # Home on the light replica (weight 1) with 1 call; the heavy one (weight 3) idle. Unweighted, 1 <= 0 + 1 keeps
    # it home; weighted, home's load (1+1)/1 = 2 exceeds the heavy one's with one more call, (0+1+1)/3: it moves.
    router, pool = _router(_eps([(L, 1.0), (H, 3.0)]), affinity=True, affinity_slack=1)
    router._affinity[("m", "R")] = L
    other = await router.acquire(pool, request="other")  # type: ignore[arg-type]
    assert other.url == H
    router.release(other)
    home = next(r for r in pool.replicas if r.url == L)  # type: ignore[attr-defined]
    home.outstanding = 1
    assert (await router.acquire(pool, request="R")).url == H  # type: ignore[arg-type]
    assert router.affinity_misses == 1
    # Home on the heavy replica with 3 calls, the light one idle (so the least loaded: 1 < 4/3). Unweighted,
    # 3 > 0 + 1 would move it; weighted, 4/3 <= (0+1+1)/1 keeps it home: its prefix cache wins.
    router, pool = _router(_eps([(L, 1.0), (H, 3.0)]), affinity=True, affinity_slack=1)
    heavy = next(r for r in pool.replicas if r.url == H)  # type: ignore[attr-defined]
    router._affinity[("m", "R")] = H
    heavy.outstanding = 3
    assert (await router.acquire(pool, request="R")).url == H  # type: ignore[arg-type]
    assert router.affinity_hits == 1
    # ... up to where its load passes the light one's plus the slack: (5+1)/3 = 2 > 2? no; (6+1)/3 > 2: moves
    heavy.outstanding = 5
    assert (await router.acquire(pool, request="R")).url == H  # type: ignore[arg-type]
    heavy.outstanding = 6
    assert (await router.acquire(pool, request="R")).url == L  # type: ignore[arg-type]


async def test_a_reload_changes_weights_and_keeps_counts() -> None:
    router, pool = _router(_eps([(H, 1.0), (L, 1.0)]))
    got = [await router.acquire(pool) for _ in range(4)]  # type: ignore[arg-type]
    assert _outstanding(pool) == {H: 2, L: 2}
    router.apply(_eps([(H, 4.0), (L, 1.0)]))
    more = [await router.acquire(pool) for _ in range(5)]  # type: ignore[arg-type]
    assert [r.url for r in more] == [H] * 5 and _outstanding(pool) == {H: 7, L: 2}   # (7+1)/4 = 2 < 3
    for r in got + more:
        router.release(r)


# -- the endpoints file ------------------------------------------------------------------------------


def test_weight_round_trips_and_is_written_only_when_not_one(tmp_path: Path) -> None:
    p = tmp_path / "ep.yaml"
    p.write_text("llms:\n  m:\n    replicas:\n      - http://a:1\n      - {url: http://b:1, weight: 2.5}\n"
                 "      - {url: http://c:1, weight: 1}\n")
    eps = load_endpoints(p)
    assert [r.weight for r in eps.llms["m"].replicas] == [1.0, 2.5, 1.0]
    out = tmp_path / "out.yaml"
    assert write_endpoints(out, eps)
    text = out.read_text()
    assert text.count("weight") == 1 and "weight: 2.5" in text
    assert load_endpoints(out) == eps


def test_files_of_like_replicas_are_written_byte_for_byte_as_before(tmp_path: Path) -> None:
    """The text the writer gave before weights existed, pinned: a weight of 1 (given or not) adds nothing."""
    out = tmp_path / "ep.yaml"
    for b in ({"url": "http://b:2", "api_key": "s", "max_outstanding": 4},
              {"url": "http://b:2", "api_key": "s", "max_outstanding": 4, "weight": 1.0}):
        eps = Endpoints.model_validate({"time_scale": 0.5, "llms": {"m": {"served_model": "m",
                                                                           "replicas": ["http://a:1", b]}}})
        write_endpoints(out, eps)
        assert out.read_text() == ("llms:\n  m:\n    max_outstanding: 256\n    replicas:\n    - url: http://a:1\n"
                                   "    - api_key: s\n      max_outstanding: 4\n      url: http://b:2\n    served_model: m\n"
                                   "schema_version: 1\ntime_scale: 0.5\n")


@pytest.mark.parametrize("bad", ["0", "-1", ".nan", ".inf", "2e9", "heavy"])
def test_a_bad_weight_is_refused_naming_the_line(tmp_path: Path, bad: str) -> None:
    p = tmp_path / "ep.yaml"
    p.write_text(f"llms:\n  m:\n    replicas:\n      - url: http://a:1\n        weight: {bad}\n")
    with pytest.raises(SpecError) as err:
        load_endpoints(p)
    assert f"{p}:" in str(err.value) and "weight" in str(err.value)


def test_endpoints_from_agents_gives_each_replica_its_weight() -> None:
    from scepsy_hpc.backend.records import AgentReport, InstanceReport
    from scepsy_hpc.gateway.endpoints import endpoints_from_agents

    def inst(llm: str, rep: int) -> InstanceReport:
        return InstanceReport(llm=llm, replica=rep, gpus=[rep], gpu_frac=1.0, mps_pct=100, url=f"http://n1:{8100 + rep}",
                              healthy=True, state="healthy")

    report = AgentReport(node="n1", host="n1", pid=1, state="ready", updated=0.0,
                         instances=[inst("gen", 0), inst("gen", 2), inst("rr", 3)])
    eps = endpoints_from_agents({"n1": report}, None, {"gen": [37.5, 37.5, 11.8]})
    assert [r.weight for r in eps.llms["gen"].replicas] == [37.5, 11.8]
    assert [r.weight for r in eps.llms["rr"].replicas] == [1.0]   # an LLM of like replicas: not listed
    assert [r.weight for r in endpoints_from_agents({"n1": report}, None).llms["gen"].replicas] == [1.0, 1.0]
