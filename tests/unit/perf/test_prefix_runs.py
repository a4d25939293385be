"""RunCache against PrefixCache: the same results, block for block, on engine-like operation sequences."""

from __future__ import annotations

import random

import pytest

from scepsy_hpc.perf.prefix import PrefixCache, segment_blocks
from scepsy_hpc.perf.prefix_runs import RunCache, Runs, segment_runs


def _state(c):
    """(pins per cached block, the unpinned blocks in LRU order, counters) of either cache."""
    if isinstance(c, PrefixCache):
        return dict(c._refs), list(c._free), c.stats
    pins, order = {}, []
    for seg, ivs in c._ivs.items():
        for iv in ivs:
            for e in range(iv.a, iv.b + 1, c.step):
                pins[(seg, e)] = iv.p
    node = c._lru.next
    while node is not c._lru:
        iv = node.iv
        ends = range(iv.a, iv.b + 1, c.step) if node.asc else range(iv.b, iv.a - 1, -c.step)
        order += [(node.seg, e) for e in ends]
        node = node.next
    assert len(pins) == len(c) and len(order) == len(c) - c.pinned
    return pins, order, c.stats


def test_runs_slice_reverse_and_name_the_blocks_segment_blocks_names():
    segs = [(("shared", "m", None, 40), 40), (7, 100), (8, 5), (9, 60)]
    runs = segment_runs(segs)
    names = [(s, e) for s, e in runs]
    want = [b if isinstance(b, tuple) else (b >> 32, b & 0xFFFFFFFF) for b in segment_blocks(segs)]
    assert names == want and len(runs) == len(want)
    for i, j in [(0, 3), (2, 9), (5, 5), (0, 100), (4, 11)]:
        assert list(runs[i:j]) == want[i:j] and len(runs[i:j]) == len(want[i:j])
        assert list(runs[i:j][::-1]) == want[i:j][::-1]
    with pytest.raises(TypeError):
        runs[0]


def _conversations(rng, n=6):
    """Conversations as (segment, tokens) lists whose names stand for their start: a call takes a
    leading part (its last piece possibly shorter, as a lane's own segment grows)."""
    out = []
    for c in range(n):
        segs = [(("shared", c % 2), rng.choice([0, 20, 40]))]
        segs += [(c * 100 + k, rng.randint(1, 90)) for k in range(rng.randint(1, 6))]
        out.append([s for s in segs if s[1] > 0])
    return out


@pytest.mark.parametrize("seed", range(60))
def test_run_cache_matches_the_block_cache_on_engine_like_sequences(seed):
    rng = random.Random(seed)
    cap = rng.choice([6, 15, 30, 60, 400])
    ends = rng.choice([0.45, 0.8])   # how often a running sequence ends: at 0.45 the pinned ones fill the cache
    ref, runs = PrefixCache(cap), RunCache(cap)
    convs = _conversations(rng)
    live = []   # (blocks as Runs, prompt blocks, output blocks)
    for step in range(400):
        op = rng.random()
        if op < 0.4 or not live:
            segs = rng.choice(convs)
            k = rng.randint(1, len(segs))
            part = segs[:k - 1] + [(segs[k - 1][0], rng.randint(1, segs[k - 1][1]))]
            prompt = sum(n for _, n in part)
            output = rng.randint(1, 40)
            blocks = segment_runs(part + [(("out", seed, step), output)])
            flat = list(blocks)
            hit = ref.lookup(flat, prompt)
            assert runs.lookup(blocks, prompt) == hit
            assert runs.unpinned(blocks[:hit // 16]) == ref.unpinned(flat[:hit // 16])
            assert runs.acquire(blocks, prompt, hit) == ref.acquire(flat, prompt, hit) == hit
            new = (hit // 16, prompt // 16)
            assert runs.insert(blocks[new[0]:new[1]]) == ref.insert(flat[new[0]:new[1]])
            live.append((blocks, prompt, output))
        elif op < ends:
            blocks, prompt, output = live.pop(rng.randrange(len(live)))
            n_prompt = prompt // 16
            flat = list(blocks)
            out = (n_prompt, (prompt + output) // 16)
            assert runs.insert(blocks[out[0]:out[1]]) == ref.insert(flat[out[0]:out[1]])
            n = n_prompt + out[1] - out[0]
            runs.release(blocks[:n][::-1])
            ref.release(flat[:n][::-1])
        elif op < 0.9:
            size = rng.randint(0, cap)
            runs.resize(size)
            ref.resize(size)
        elif op < 0.95:   # a stretch released again while unpinned (or not cached): refreshed or skipped
            segs = rng.choice(convs)
            blocks = segment_runs(segs)
            i = rng.randrange(len(blocks) + 1)
            j = rng.randint(i, len(blocks))
            runs.release(blocks[i:j][::-1])
            ref.release(list(blocks)[i:j][::-1])
        else:   # a lookup from routing, which changes nothing
            segs = rng.choice(convs)
            blocks = segment_runs(segs)
            p = sum(n for _, n in segs)
            assert runs.lookup(blocks, p) == ref.lookup(list(blocks), p)
        assert _state(runs) == _state(ref), step
        assert runs.pinned == ref.pinned and len(runs) == len(ref)


def test_a_release_of_an_unpinned_or_uncached_stretch_refreshes_or_skips_it():
    ref, runs = PrefixCache(100), RunCache(100)
    a = Runs(((1, 16, 160),))
    for c, b in ((ref, list(a)), (runs, a)):
        c.insert(b)
        c.release(b[::-1])
    for c, b in ((ref, list(a)), (runs, a)):   # released again while unpinned: most recently used, in order
        c.release(b[3:6][::-1] if c is runs else b[3:6][::-1])
    assert _state(runs) == _state(ref)
    gap = Runs(((1, 16, 160), (2, 16, 64)))
    runs.release(gap[::-1])
    ref.release(list(gap)[::-1])
    assert _state(runs) == _state(ref)
