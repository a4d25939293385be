"""vLLM-style automatic prefix caching, modelled block by block.

vLLM (V1, prefix caching on by default) keeps the KV of *full* blocks (`block_size` tokens, 16 by
default) under a hash of the block's tokens chained with the hash of the block before it, so a block
hash names the whole prefix up to the block's end. A new request looks up its prompt's block hashes
in order and reuses the leading run it finds; only the rest is prefilled. When every prompt token
would hit, the last one is computed anyway (the engine needs its logits), so a hit covers at most
`prompt − 1` tokens, rounded down to whole blocks. Blocks a running request uses are pinned; freed
blocks stay cached until the space is needed, evicted least recently used first.

Counters follow vLLM's `vllm:prefix_cache_queries_total` (prompt tokens looked up) and
`vllm:prefix_cache_hits_total` (of those, tokens found cached).

Callers name blocks however they can: the HTTP sim engine hashes its (pseudo-)tokens, the simulator
names a block by (segment, end position) of a conversation tree. `PrefixCache` only needs hashable
block names, each naming its whole prefix (two equal names mean equal content up to that block's end).
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import compress, islice, repeat, takewhile
from operator import add, not_, sub
from dataclasses import dataclass
from typing import Hashable, Sequence

BLOCK_TOKENS = 16   # vLLM's default --block-size on CUDA


# Prefix affinity: how much busier than the least loaded replica the one holding a call's prefix may be and
# still get the call (the gateway's rule and the simulator's). A call that leaves its prefix's replica
# prefills its whole context again elsewhere, and the load that adds makes more calls leave: with a slack
# of one call, react_agent × 16's instance-bound allocation (the agent on 5 × tp1) served 4.9 rps of 15
# offered, its agent's prefix hit rate down to 44%; with 8 calls or 1.5× it serves 14.4 at 87% (the warm
# rate the workflow offers). vLLM's router and SGLang's gateway keep a cache-aware route until the
# imbalance passes 64 requests and 1.5×; 64 piles long conversations onto small replicas: group_chat_selector's
# ¼-GPU selectors 74.8 s mean latency against 47.5 s with 8, supervisor_agents 1.5 rps served of 5 against 3.3
# (scripts/bench_affinity.py, 3,000 requests a run).
DEFAULT_AFFINITY_SLACK = 8      # calls of the least loaded replica
DEFAULT_AFFINITY_RATIO = 1.5    # times the least loaded replica's load


def affine_ok(home_load: float, least_load: float, least_weight: float = 1.0, slack: float = DEFAULT_AFFINITY_SLACK,
              ratio: float = DEFAULT_AFFINITY_RATIO) -> bool:
    """Whether a call may go to the replica holding its prefix: that replica's load with the call
    ((outstanding + 1) / weight; weight 1 for like replicas) is at most the least loaded free replica's
    plus `slack` calls of that replica, or `ratio` times it."""
    return home_load <= max(least_load + slack / least_weight, ratio * least_load)


def max_hit_tokens(prompt_tokens: int, block_tokens: int = BLOCK_TOKENS) -> int:
    """The most prompt tokens a cache hit may cover: prompt − 1, rounded down to whole blocks."""
    return max(0, (prompt_tokens - 1) // block_tokens * block_tokens)


def full_blocks(tokens: int, block_tokens: int = BLOCK_TOKENS) -> int:
    """How many full blocks `tokens` tokens fill (only full blocks are cached)."""
    return max(0, tokens) // block_tokens


@dataclass
class PrefixStats:
    """Counters under vLLM's names (tokens, not requests)."""

    queries: int = 0   # vllm:prefix_cache_queries_total
    hits: int = 0      # vllm:prefix_cache_hits_total
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        """hits / queries (0 before any query)."""
        return self.hits / self.queries if self.queries else 0.0


def cache_size(capacity_blocks: int, block_tokens: int) -> tuple[int, int]:
    """(capacity_blocks, block_tokens) of a prefix cache, checked: a ValueError names a bad one."""
    if capacity_blocks < 0:
        raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    return capacity_blocks, block_tokens


class PrefixCache:
    """The cached blocks of one engine: at most `capacity_blocks` of them, pinned ones never evicted.

    `lookup` (no side effects) says how many leading tokens a prompt would reuse; `acquire` counts the
    query, pins the reused blocks and returns the hit; `insert` caches a sequence's full blocks (pinned
    while it runs) and `release` unpins them when it ends. Capacity is in blocks; when inserting would
    exceed it, unpinned blocks are evicted LRU, and a block that cannot fit is not cached.
    """

    def __init__(self, capacity_blocks: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.capacity, self.block_tokens = cache_size(capacity_blocks, block_tokens)
        self._refs: dict[Hashable, int] = {}                  # cached block → pins
        self._free: OrderedDict[Hashable, None] = OrderedDict()   # unpinned cached blocks, LRU first
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._refs)

    @property
    def pinned(self) -> int:
        """Cached blocks some running sequence uses."""
        return len(self._refs) - len(self._free)

    def unpinned(self, blocks: Sequence[Hashable]) -> int:
        """How many of these (cached) blocks no sequence pins: acquiring them takes them out of the free space."""
        return list(map(self._refs.get, blocks)).count(0)

    def __contains__(self, block: Hashable) -> bool:
        return block in self._refs

    def _run(self, blocks: Sequence[Hashable], prompt_tokens: int) -> int:
        limit = min(len(blocks), max_hit_tokens(prompt_tokens, self.block_tokens) // self.block_tokens)
        return len(list(takewhile(self._refs.__contains__, islice(blocks, limit))))   # the loop runs in C

    def lookup(self, blocks: Sequence[Hashable], prompt_tokens: int) -> int:
        """Leading prompt tokens that are cached (whole blocks, at most prompt − 1); changes nothing."""
        return self._run(blocks, prompt_tokens) * self.block_tokens

    def acquire(self, blocks: Sequence[Hashable], prompt_tokens: int, hit: int | None = None) -> int:
        """A request's prompt is scheduled: count the query, pin (and refresh) its cached leading blocks,
        return the hit in tokens. Pair with `release(blocks[:hit // block_tokens])`. `hit`: what `lookup`
        just said for the same blocks with nothing changed since (saves looking them up again)."""
        n = self._run(blocks, prompt_tokens) if hit is None else hit // self.block_tokens
        refs, free = self._refs, self._free
        head = list(islice(blocks, n))               # every one cached (`_run`), each named once
        pins = list(map(refs.__getitem__, head))
        for b in compress(head, map(not_, pins)):    # unpinned until now: out of the free list
            del free[b]
        refs.update(zip(head, map(add, pins, repeat(1))))
        self.stats.queries += prompt_tokens
        self.stats.hits += n * self.block_tokens
        return n * self.block_tokens

    def insert(self, blocks: Sequence[Hashable]) -> int:
        """Cache these blocks (a sequence's full blocks once computed) and pin them for the sequence;
        returns how many were pinned (fewer when the pinned blocks fill the cache). Blocks already
        cached are pinned once more. `blocks` names each block once."""
        refs, free = self._refs, self._free
        pins = list(map(refs.get, blocks))
        if 0 in pins:   # one of them is cached unpinned: evicting for another may take it first, one by one
            return self._insert_each(blocks)
        # otherwise no eviction touches them: the least recently used free blocks go, as one by one
        new = pins.count(None)
        slots = self.capacity - len(refs)
        fit = min(new, max(0, slots + len(free)))
        if fit < new:   # the cache is full of pinned blocks: insertion stops at the first new block that cannot fit
            seen, cut = 0, 0
            for cut, r in enumerate(pins):
                if r is None:
                    if seen == fit:
                        break
                    seen += 1
            blocks, pins = blocks[:cut], pins[:cut]
        over = min(fit - slots, len(free)) if new else 0   # only a new block makes room (one that fails, all it can)
        if over > 0:
            pop = free.popitem
            for _ in range(over):
                del refs[pop(last=False)[0]]
            self.stats.evictions += over
        refs.update(zip(blocks, [1 if r is None else r + 1 for r in pins]))
        return len(pins)

    def _insert_each(self, blocks: Sequence[Hashable]) -> int:
        refs, free = self._refs, self._free
        n = 0
        for b in blocks:
            r = refs.get(b)
            if r is None:
                if len(refs) >= self.capacity and not self._make_room():
                    break
                refs[b] = 1
            else:
                if r == 0:
                    del free[b]
                refs[b] = r + 1
            n += 1
        return n

    def release(self, blocks: Sequence[Hashable]) -> None:
        """Unpin blocks (the sequence that used them ended); they stay cached, most recently used last.
        `blocks` names each block once."""
        refs, free = self._refs, self._free
        pins = list(map(refs.get, blocks))
        if None in pins or 0 in pins:   # some uncached or unpinned: one by one
            self._release_each(blocks)
            return
        refs.update(zip(blocks, map(sub, pins, repeat(1))))
        free.update(dict.fromkeys(compress(blocks, map((1).__eq__, pins))))   # unpinned now: last, in order

    def _release_each(self, blocks: Sequence[Hashable]) -> None:
        refs, free = self._refs, self._free
        for b in blocks:
            r = refs.get(b)
            if r is None:
                continue
            if r > 1:
                refs[b] = r - 1
            elif r == 1:
                refs[b] = 0
                free[b] = None          # a new key: most recently used, last
            else:
                free.move_to_end(b)     # released again while unpinned: refreshed

    def resize(self, capacity_blocks: int) -> None:
        """A new capacity (the KV space left to the cache); evicts unpinned blocks beyond it."""
        self.capacity = max(0, capacity_blocks)
        over = min(len(self._refs) - self.capacity, len(self._free))
        if over > 0:
            refs, pop = self._refs, self._free.popitem
            for _ in range(over):       # least recently used first, as `_evict` one at a time
                del refs[pop(last=False)[0]]
            self.stats.evictions += over

    def _pin(self, b: Hashable) -> None:
        refs = self._refs.get(b, 0)
        if refs == 0:
            self._free.pop(b, None)
        self._refs[b] = refs + 1

    def _make_room(self) -> bool:
        while len(self._refs) >= self.capacity:
            if not self._free:
                return False
            self._evict()
        return True

    def _evict(self) -> None:
        b, _ = self._free.popitem(last=False)
        del self._refs[b]
        self.stats.evictions += 1


def chained_hashes(token_ids: Sequence[Hashable], block_tokens: int = BLOCK_TOKENS, seed: Hashable = None) -> list[int]:
    """Block names of a token sequence as vLLM builds them: each full block's hash chains the previous
    block's hash with the block's tokens (`seed` separates caches that must not share, e.g. models)."""
    out: list[int] = []
    parent: Hashable = seed
    for i in range(full_blocks(len(token_ids), block_tokens)):
        parent = hash((parent, tuple(token_ids[i * block_tokens:(i + 1) * block_tokens])))
        out.append(parent)
    return out


_END_BITS = 32   # a block of an int-named segment is named seg << 32 | end: one int, one hash, no tuple


def segment_blocks(segments: Sequence[tuple[Hashable, int]], block_tokens: int = BLOCK_TOKENS) -> list[Hashable]:
    """Names of the full blocks of content laid out as (segment, tokens) pieces, where a segment's name stands
    for its content and everything before it (a conversation tree, `workload.sampler.Call.segments`): block j
    is named by (segment holding its last token, its end position). Two layouts agree on a block name exactly
    when they agree on everything up to that block's end, as chained hashes do.

    The name is the pair `(segment, end)`, except for a segment named by a non-negative int (a conversation
    piece): then the one int `segment << 32 | end`, the same pair packed, so that the prefix cache's dict
    lookups hash an int instead of a tuple and a segment's names are one `range` (the simulator names
    hundreds of blocks a call). The two forms never meet: an int is never equal to a tuple."""
    out: list[Hashable] = []
    start = 0
    for seg, n in segments:
        end = start + n
        first = (start // block_tokens + 1) * block_tokens     # the first block end inside this segment
        if type(seg) is int and seg >= 0 and end < 1 << _END_BITS:
            base = seg << _END_BITS
            out += range(base + first, base + end + 1, block_tokens)
        else:
            out += [(seg, e) for e in range(first, end + 1, block_tokens)]
        start = end
    return out
