"""The simulated engine's prefix cache: eviction under a small KV cache (hand-derived), prefix-affinity
routing, replay with per-request segment names."""

from __future__ import annotations

import pytest

from scepsy_hpc.perf.engine import EnginePool, SimEngine
from scepsy_hpc.perf.events import PRIO_ENGINE, EventLoop
from scepsy_hpc.perf.fit import check_fit
from scepsy_hpc.perf.model import EngineConfig
from scepsy_hpc.perf.prefix import affine_ok, segment_blocks
from scepsy_hpc.perf.replay import fresh_segments, replay_calls
from scepsy_hpc.workload.sampler import Call


def _pool(models, gpus, replicas=1, kv_cap=None, **kw):
    loop = EventLoop()
    perf = check_fit(EngineConfig(models["llama-3.1-8b-instruct"], gpus["h100-sxm"]), label="t")
    engines = [SimEngine(loop, perf, f"m/{r}", PRIO_ENGINE) for r in range(replicas)]
    for e in engines:
        if kv_cap is not None:
            e.kv_cap = kv_cap
    return loop, EnginePool(engines, **kw)


def _blocks(segs, out, out_tokens):
    return segment_blocks(tuple(segs) + ((out, out_tokens),))


def _three_calls(loop, pool):
    """A: conversation a (800 + 40 answer); B: unrelated (500 + 20); C: continues a (+100 new, 20 out)."""
    got = {}

    def submit(name, t, segs, out, out_tokens):
        p = sum(n for _, n in segs)
        loop.at(t, 0, lambda now, _: pool.submit("m", None, p, out_tokens, now,
                                                   lambda te, s: got.__setitem__(name, s), _blocks(segs, out, out_tokens)))

    submit("A", 0.0, [("a", 800)], "ao", 40)
    submit("B", 100.0, [("b", 500)], "bo", 20)
    submit("C", 200.0, [("a", 800), ("ao", 40), ("c", 100)], "co", 20)
    loop.run()
    return got


def test_a_small_kv_cache_evicts_and_the_hit_drops(models, gpus):
    # KV of 1024 tokens = 64 blocks. A ends: 840 tokens → 52 blocks cached, unpinned (head released last).
    # B is admitted: it reserves 500 + 20 = 520 tokens, leaving 504 free → 31 blocks, so 52 − 31 = 21 of
    # A's blocks are evicted, tail first: A keeps its first 31 blocks (496 tokens).
    # C (prompt 940) would reuse A's 52 blocks (832 tokens ≤ 939); it finds 31 → hit 496, prefill 444.
    # C ends: the cache holds A's 31 + B's 32 (520 → 32 blocks) + C's 27 new prompt + 2 answer blocks
    # (960 → 60 blocks) = 92 blocks in a KV of 64 → 28 more evicted: 49 in all.
    loop, pool = _pool(models, gpus, kv_cap=1024)
    got = _three_calls(loop, pool)
    eng = pool.replicas[0]
    assert (got["A"].cached, got["B"].cached, got["C"].cached) == (0, 0, 496)
    assert eng.prefix_evictions == 21 + 28 and len(eng.pcache) == 64
    assert (eng.prompt_tokens, eng.cached_tokens) == (800 + 500 + 940, 496)


def test_a_large_kv_cache_keeps_the_whole_conversation(models, gpus):
    loop, pool = _pool(models, gpus)
    got = _three_calls(loop, pool)
    assert got["C"].cached == 832 and pool.replicas[0].prefix_evictions == 0


def test_a_seq_without_blocks_leaves_the_engine_without_a_cache(models, gpus):
    loop, pool = _pool(models, gpus)
    pool.submit("m", None, 300, 10, 0.0, lambda t, s: None)
    loop.run()
    assert pool.replicas[0].pcache is None and pool.replicas[0].prompt_tokens == 300


def _conversation_routes(models, gpus, affinity):
    loop, pool = _pool(models, gpus, replicas=2, prefix_affinity=affinity)
    where = []
    first = _blocks([("x", 400)], "xo", 30)
    second = _blocks([("x", 400), ("xo", 30), ("y", 50)], "yo", 30)
    loop.at(0.0, 0, lambda now, _: pool.submit("m", None, 400, 30, now, lambda t, s: where.append(s.replica), first))
    loop.at(50.0, 0, lambda now, _: pool.submit("m", None, 480, 30, now, lambda t, s: where.append(s.replica), second))
    loop.run()
    return where


def test_prefix_affinity_keeps_a_conversation_on_its_replica(models, gpus):
    # both replicas idle at the second call: round-robin would pick replica 1; affinity picks 0, which holds the prefix
    assert _conversation_routes(models, gpus, True) == [0, 0]
    assert _conversation_routes(models, gpus, False) == [0, 1]


def _continuations(models, gpus, n, **kw):
    """Replicas of `n` long continuations submitted at once, all holding their prefix on replica 0."""
    loop, pool = _pool(models, gpus, replicas=2, **kw)
    where = []
    conv = _blocks([("x", 400)], "xo", 30)

    def cont(k):
        return _blocks([("x", 400), ("xo", 30), (("y", k), 50)], ("yo", k), 4000)

    loop.at(0.0, 0, lambda now, _: pool.submit("m", None, 400, 30, now, lambda t, s: None, conv))   # → replica 0
    for k in range(n):
        loop.at(50.0, 0, lambda now, k: pool.submit("m", None, 480, 4000, now, lambda t, s: where.append((k, s.replica)), cont(k)), k)
    loop.run()
    return [r for _, r in sorted(where)]


def test_affinity_yields_to_load_beyond_the_slack(models, gpus):
    # slack 1, no ratio (the rule before): loads with the call 1, 2 ≤ 1 + 1 stay; 3 > 2 goes to replica 1
    assert _continuations(models, gpus, 3, affinity_slack=1, affinity_ratio=0.0) == [0, 0, 1]
    # the default, 8 calls or 1.5×: replica 0 takes 9 (load 9 ≤ 1 + 8), the 10th goes to the idle one; then 10 ≤ 2 + 8
    # stays, 11 > max(10, 3) leaves
    assert _continuations(models, gpus, 12) == [0] * 9 + [1] + [0] + [1]


def test_affinity_rule_reads_slack_and_ratio_in_the_least_loaded_replicas_calls():
    assert affine_ok(9, 1) and not affine_ok(10, 1)              # small loads: the slack of 8 decides
    assert affine_ok(60, 40) and not affine_ok(61, 40)           # large ones: 1.5× decides (40 + 8 < 60)
    assert affine_ok(3, 1, slack=2, ratio=0) and not affine_ok(4, 1, slack=2, ratio=0)
    # unlike replicas: the slack counts calls of the least-loaded replica (weight 4: 8 calls are 2 load units)
    assert affine_ok(3.0, 1.0, least_weight=4.0) and not affine_ok(3.1, 1.0, least_weight=4.0)


def test_a_pool_refuses_a_negative_or_nan_affinity(models, gpus):
    for kw in ({"affinity_slack": -1}, {"affinity_ratio": float("nan")}, {"affinity_ratio": -0.5}):
        with pytest.raises(ValueError, match="affinity_slack="):
            _pool(models, gpus, replicas=2, **kw)


def test_fresh_segments_separates_replayed_requests_but_keeps_shared_ones(models, gpus):
    shared = (("shared", "m", None, 320), 320)
    c1 = Call("m", None, 400, 40, (shared, (1, 80)), 2)
    c2 = Call("m", None, 540, 40, (shared, (1, 80), (2, 40), (3, 100)), 4)
    r1, r2 = fresh_segments([c1, c2]), fresh_segments([c1, c2])
    assert r1[1].segments[:2] == r1[0].segments and r1[1].segments[2][0] == r1[0].output_segment
    assert r1[0].segments[0] == shared and r1[0].segments[1] != r2[0].segments[1]
    cfg = EngineConfig(models["llama-3.1-8b-instruct"], gpus["h100-sxm"])
    recs = sorted(replay_calls(cfg, r1 + r2, [0.0, 100.0, 200.0, 300.0]), key=lambda r: r.request)
    # 320 shared tokens = 20 blocks: the second replayed request reuses them, not the first one's conversation
    # (400 + 40 = 440 → 27 blocks = 432 tokens, what a continuing call reuses)
    assert [r.cached_tokens for r in recs] == [0, 432, 320, 432]
    plain = replay_calls(cfg, [c1, c2, c1, c2], [0.0, 100.0, 200.0, 300.0])
    # unrenamed, the 2nd request hits the 1st's conversation: c1 again finds its 25 prompt blocks but may reuse
    # 399 → 24 blocks = 384; c2 again finds 580 → 36 blocks, may reuse 539 → 33 blocks = 528
    assert [r.cached_tokens for r in sorted(plain, key=lambda r: r.request)] == [0, 432, 384, 528]


def test_a_call_held_at_the_gateway_uses_the_cache_of_the_replica_that_takes_it(models, gpus):
    loop = EventLoop()
    perf = check_fit(EngineConfig(models["llama-3.1-8b-instruct"], gpus["h100-sxm"], max_num_seqs=1), label="t")
    pool = EnginePool([SimEngine(loop, perf, f"m/{r}", PRIO_ENGINE) for r in range(2)])
    got = []
    pool.submit("m", None, 100, 50, 0.0, lambda t, s: None)      # both replicas busy with calls without blocks
    pool.submit("m", None, 100, 80, 0.0, lambda t, s: None)
    blocks = _blocks([("x", 400)], "xo", 30)
    pool.submit("m", None, 400, 30, 0.0, lambda t, s: got.append(s), blocks)   # held in the shared queue
    loop.run()
    assert len(got) == 1 and got[0].t_admit > 0.0 and got[0].cached == 0
    assert sum(e.pcache is not None and len(e.pcache) == 26 for e in pool.replicas) == 1   # 430 → 26 blocks


def test_reused_blocks_take_kv_space_while_their_reader_runs(models, gpus):
    # KV of 1024 tokens. A (800 + 40) ends: 52 blocks (832 tokens) cached. C continues conversation a: prompt
    # 940, answer 60; it reuses the 52 blocks (832 ≤ 939), which it pins, and reserves 940 + 60 − 832 = 168:
    # 832 + 168 = 1000 of 1024 in use. D (100 + 20 = 120) arrives while C runs: 1000 + 120 > 1024, so D waits
    # for C to end. (Counting C's reused blocks as free space would admit D at once: 168 + 120 ≤ 1024.)
    loop, pool = _pool(models, gpus, kv_cap=1024)
    got = {}

    def submit(name, t, segs, out, out_tokens):
        p = sum(n for _, n in segs)
        loop.at(t, 0, lambda now, _: pool.submit("m", None, p, out_tokens, now,
                                                   lambda te, s: got.__setitem__(name, s), _blocks(segs, out, out_tokens)))

    submit("A", 0.0, [("a", 800)], "ao", 40)
    submit("C", 100.0, [("a", 800), ("ao", 40), ("c", 100)], "co", 60)
    submit("D", 100.0001, [("d", 100)], "do", 20)
    loop.run()
    assert got["C"].cached == 832
    assert got["D"].t_admit >= got["C"].t_end
