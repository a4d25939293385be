"""The block prefix cache: vLLM's hit rule (whole blocks, at most prompt − 1), pins, LRU eviction, counters."""

from __future__ import annotations

import pytest

from scepsy_hpc.perf.prefix import PrefixCache, chained_hashes, full_blocks, max_hit_tokens


def test_hit_rule_is_whole_blocks_of_at_most_prompt_minus_one():
    assert max_hit_tokens(1) == 0
    assert max_hit_tokens(16) == 0      # all 16 would hit: the last token is recomputed, so no full block
    assert max_hit_tokens(17) == 16
    assert max_hit_tokens(33) == 32
    assert max_hit_tokens(48) == 32
    assert full_blocks(47) == 2 and full_blocks(48) == 3


def test_a_conversation_reuses_its_earlier_turns_and_counts_like_vllm():
    c = PrefixCache(capacity_blocks=100)
    turn1 = list(range(40))                       # 2 full blocks
    b1 = chained_hashes(turn1)
    assert c.acquire(b1, 40) == 0
    c.insert(b1)
    c.release(b1)
    turn2 = turn1 + list(range(1000, 1030))       # 70 tokens: 4 full blocks, the first 2 shared
    b2 = chained_hashes(turn2)
    assert b2[:2] == b1
    assert c.lookup(b2, 70) == 32
    assert c.acquire(b2, 70) == 32
    assert (c.stats.queries, c.stats.hits) == (110, 32)
    assert c.stats.hit_rate == pytest.approx(32 / 110)


def test_pinned_blocks_are_never_evicted_and_free_ones_go_lru():
    c = PrefixCache(capacity_blocks=3)
    a, b, d = ["a"], ["b"], ["d"]
    for x in (a, b, d):
        c.insert(x)
    assert c.insert(["e"]) == 0                   # all pinned: nothing to evict, not cached
    c.release(b)
    c.release(a)                                  # a freed last: b is the least recently used
    assert c.insert(["e"]) == 1
    assert "b" not in c and "a" in c and "e" in c
    assert c.stats.evictions == 1
    c.resize(1)                                   # d and e pinned, a free: a goes, the pinned stay
    assert "a" not in c and len(c) == 2


def test_a_hit_refreshes_a_block_in_the_lru_order():
    c = PrefixCache(capacity_blocks=2)
    c.insert(["x"]); c.release(["x"])
    c.insert(["y"]); c.release(["y"])
    assert c.acquire(["x"], 17) == 16             # x used again: y is now the oldest
    c.release(["x"])
    c.insert(["z"])
    assert "y" not in c and "x" in c


def test_chained_hashes_name_the_prefix_not_the_block():
    same_block_other_prefix = chained_hashes([9] * 16 + [1] * 16)[1]
    assert same_block_other_prefix != chained_hashes([1] * 32)[1]
    assert chained_hashes([1] * 32, seed="m1") != chained_hashes([1] * 32, seed="m2")


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="capacity_blocks"):
        PrefixCache(-1)
    with pytest.raises(ValueError, match="block_tokens"):
        PrefixCache(4, block_tokens=0)


def test_segment_blocks_name_each_block_by_the_segment_holding_its_end():
    from scepsy_hpc.perf.prefix import segment_blocks

    # system 20 tokens, then 30 new: blocks end at 16 (in "sys"), 32 and 48 (in "a"); 50 leaves a partial block
    assert segment_blocks([("sys", 20), ("a", 30)]) == [("sys", 16), ("a", 32), ("a", 48)]
    # the continuation repeats the history: its first three blocks are the same names
    cont = segment_blocks([("sys", 20), ("a", 30), ("out", 14), ("b", 40)])
    assert cont[:3] == [("sys", 16), ("a", 32), ("a", 48)] and cont[3:] == [("out", 64), ("b", 80), ("b", 96)]
    assert segment_blocks([("x", 15)]) == [] and segment_blocks([("x", 16)]) == [("x", 16)]
    assert segment_blocks([("x", 0), ("y", 16)]) == [("y", 16)]


def test_an_int_named_segment_packs_its_block_names_into_ints_that_meet_no_other_name():
    from scepsy_hpc.perf.prefix import segment_blocks

    names = segment_blocks([(("shared", "m", None, 20), 20), (7, 30), (8, 14)])
    assert names == [(("shared", "m", None, 20), 16), 7 << 32 | 32, 7 << 32 | 48, 8 << 32 | 64]
    # the same layout names the same blocks; another segment's (or another position's) never equal
    assert segment_blocks([(7, 50)], 16) == segment_blocks([(7, 50)])
    assert not set(segment_blocks([(7, 64)])) & set(segment_blocks([(8, 64)]))
    assert segment_blocks([(True, 32)]) == [(True, 16), (True, 32)]   # a bool is a name, not a number


def test_the_batched_insert_and_release_match_one_block_at_a_time():
    """Random sequences of acquire / insert / release / resize on two caches, one through the batched
    paths and one through the one-by-one reference, end in the same blocks, pins, LRU order and counts."""
    import random

    rng = random.Random(5)
    for trial in range(60):
        cap = rng.choice([8, 20, 40, 200])
        fast, ref = PrefixCache(cap), PrefixCache(cap)
        ref.insert, ref.release = ref._insert_each, ref._release_each
        live: list[list[int]] = []
        for _ in range(150):
            op = rng.random()
            if op < 0.45 or not live:
                seg = rng.randrange(12)
                blocks = [seg << 32 | e for e in range(16, 16 * rng.randint(1, 30) + 1, 16)]
                prompt = 16 * len(blocks) + rng.randrange(16)
                got = [c.acquire(blocks, prompt) for c in (fast, ref)]
                n = [c.insert(blocks[got[0] // 16:]) for c in (fast, ref)]
                assert got[0] == got[1] and n[0] == n[1]
                live.append(blocks[:got[0] // 16 + n[0]])
            elif op < 0.85:
                blocks = live.pop(rng.randrange(len(live)))
                for c in (fast, ref):
                    c.release(blocks[::-1])
            elif op < 0.93:   # a release of blocks not pinned (cached unpinned, or gone): the slow path's cases
                blocks = [rng.randrange(12) << 32 | 16 * rng.randint(1, 30) for _ in range(5)]
                for c in (fast, ref):
                    c.release(list(dict.fromkeys(blocks)))
            else:
                size = rng.randint(0, cap)
                for c in (fast, ref):
                    c.resize(size)
            assert fast._refs == ref._refs and list(fast._free) == list(ref._free), trial
            assert fast.stats == ref.stats
