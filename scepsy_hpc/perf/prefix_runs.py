"""`perf.prefix`'s block prefix cache, held as runs of blocks of one conversation segment.

The simulator names a call's cache blocks by (segment, end position) (`prefix.segment_blocks`): a call
of a long conversation names hundreds of blocks, but only a few segments, and every operation of the
engine on them (look up the leading cached run, pin it, cache the computed blocks, unpin them tail
first) touches whole stretches of consecutive blocks of one segment. `RunCache` keeps exactly the state
`PrefixCache` keeps — each cached block's pins, and the least-recently-used order of the unpinned ones —
but as intervals of one segment with one pin count, and the LRU order as chunks (an interval's blocks,
oldest first in the order they were freed). An operation costs per interval it touches, not per block.
Its results are `PrefixCache`'s, block for block (tested against it on random operation sequences):
the same hits, pins, evictions and counters, so a simulation gives the same figures either way.

`Runs` is the block list it takes: runs (segment, first end, last end) with slicing and reversal, the
only list operations the engine uses (`perf.engine.SimEngine`). `segment_runs` builds one.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Hashable, Iterator, Sequence

from scepsy_hpc.perf.prefix import BLOCK_TOKENS, PrefixStats, cache_size


class Runs:
    """Block names (segment, end) held as runs (segment, first end, last end) of one segment, ends a
    `step` apart, in list order; `rev`: the same names in reverse order (last run first, each descending)."""

    __slots__ = ("runs", "step", "rev", "_n")

    def __init__(self, runs: tuple[tuple[Hashable, int, int], ...], step: int = BLOCK_TOKENS,
                 rev: bool = False, n: int | None = None) -> None:
        self.runs = runs
        self.step = step
        self.rev = rev
        self._n = sum((b - a) // step + 1 for _, a, b in runs) if n is None else n

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[tuple[Hashable, int]]:
        s = self.step
        if not self.rev:
            for seg, a, b in self.runs:
                for e in range(a, b + 1, s):
                    yield seg, e
        else:
            for seg, a, b in reversed(self.runs):
                for e in range(b, a - 1, -s):
                    yield seg, e

    def __getitem__(self, key: slice) -> "Runs":
        if not isinstance(key, slice):
            raise TypeError("Runs are sliced, not indexed")
        if key.step == -1 and key.start is None and key.stop is None:
            return Runs(self.runs, self.step, not self.rev, self._n)
        if key.step not in (None, 1) or self.rev:
            raise ValueError("Runs take [i:j] of the forward order and [::-1]")
        start, stop, _ = key.indices(self._n)
        if start == 0 and stop == self._n:
            return self            # immutable: the whole of it is itself
        s, out, i = self.step, [], 0
        for seg, a, b in self.runs:
            if i >= stop:
                break
            c = (b - a) // s + 1
            lo, hi = start - i, stop - i
            if lo < 0:
                lo = 0
            if hi > c:
                hi = c
            if lo < hi:
                out.append((seg, a + lo * s, a + (hi - 1) * s))
            i += c
        return Runs(tuple(out), s, False, stop - start if stop > start else 0)


def segment_runs(segments: Sequence[tuple[Hashable, int]], block_tokens: int = BLOCK_TOKENS) -> Runs:
    """`prefix.segment_blocks`'s blocks as `Runs`: per segment, its first and last full-block end."""
    out = []
    start = count = 0
    for seg, n in segments:
        end = start + n
        first = (start // block_tokens + 1) * block_tokens
        if first <= end:
            last = end // block_tokens * block_tokens
            out.append((seg, first, last))
            count += (last - first) // block_tokens + 1
        start = end
    return Runs(tuple(out), block_tokens, n=count)


class _Iv:
    """Cached blocks a … b (ends `step` apart) of one segment with `p` pins; unpinned (p = 0) they are
    one chunk of the LRU order, `node`."""

    __slots__ = ("a", "b", "p", "node")

    def __init__(self, a: int, b: int, p: int, node: "_Node | None" = None) -> None:
        self.a, self.b, self.p, self.node = a, b, p, node


class _Node:
    """A chunk of the LRU list: an unpinned interval's blocks, oldest first: from `a` up (`asc`) or from `b` down."""

    __slots__ = ("prev", "next", "seg", "iv", "asc")

    def __init__(self, seg: Hashable = None, iv: _Iv | None = None, asc: bool = True) -> None:
        self.prev: _Node = self
        self.next: _Node = self
        self.seg, self.iv, self.asc = seg, iv, asc


def _start(iv: _Iv) -> int:
    return iv.a


class RunCache:
    """`prefix.PrefixCache` over `Runs`: the same operations and results, in time per interval touched."""

    def __init__(self, capacity_blocks: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.capacity, self.block_tokens = cache_size(capacity_blocks, block_tokens)
        self._ivs: dict[Hashable, list[_Iv]] = {}   # segment → its cached intervals, by position
        self._n = 0        # cached blocks
        self._nfree = 0    # of them unpinned
        self._lru = _Node()   # sentinel: _lru.next is the least recently used chunk
        self.stats = PrefixStats()

    # ---- what PrefixCache offers ----

    def __len__(self) -> int:
        return self._n

    @property
    def pinned(self) -> int:
        """Cached blocks some running sequence uses."""
        return self._n - self._nfree

    def __contains__(self, block: tuple[Hashable, int]) -> bool:
        seg, e = block
        return self._at(seg, e) is not None

    def lookup(self, blocks: Runs, prompt_tokens: int) -> int:
        """Leading prompt tokens that are cached (whole blocks, at most prompt − 1); changes nothing."""
        return self._run(blocks, prompt_tokens) * self.block_tokens

    def unpinned(self, blocks: Runs) -> int:
        """How many of these (cached) blocks no sequence pins."""
        n = 0
        s = self.step
        for seg, a, b in blocks.runs:
            for iv in self._ivs.get(seg, ()):
                if iv.p == 0 and iv.b >= a and iv.a <= b:
                    n += (min(iv.b, b) - max(iv.a, a)) // s + 1
        return n

    def acquire(self, blocks: Runs, prompt_tokens: int, hit: int | None = None) -> int:
        """Count the query, pin (and take out of the LRU order) the cached leading blocks, return the hit."""
        n = self._run(blocks, prompt_tokens) if hit is None else hit // self.block_tokens
        for seg, a, b in blocks[:n].runs:
            pos = a
            while pos <= b:
                lst, i = self._piece(seg, pos, b)
                iv = lst[i]
                if iv.p == 0:
                    self._unlink(iv)
                iv.p += 1
                pos = iv.b + self.step
            self._tidy(seg)
        self.stats.queries += prompt_tokens
        self.stats.hits += n * self.block_tokens
        return n * self.block_tokens

    def insert(self, blocks: Runs) -> int:
        """Cache and pin these blocks in order (evicting least recently used unpinned ones for room);
        stops at the first that cannot fit. Returns how many were pinned."""
        s, done = self.step, 0
        for seg, a, b in blocks.runs:
            pos = a
            while pos <= b:
                lst = self._ivs.get(seg)
                i = bisect_right(lst, pos, key=_start) - 1 if lst else -1
                if i >= 0 and lst[i].b >= pos:          # cached: pinned once more
                    lst, i = self._piece(seg, pos, b)
                    iv = lst[i]
                    if iv.p == 0:
                        self._unlink(iv)
                    iv.p += 1
                    done += (iv.b - iv.a) // s + 1
                    pos = iv.b + s
                    continue
                nxt = lst[i + 1].a - s if lst is not None and i + 1 < len(lst) else b
                y = min(nxt, b)
                g = (y - pos) // s + 1                   # a gap of g uncached blocks
                fit = min(g, max(0, self.capacity - self._n + self._nfree))
                self._evict(self._nfree if fit < g else max(0, self._n + g - self.capacity))
                if fit:
                    self._add(seg, _Iv(pos, pos + (fit - 1) * s, 1))
                    self._n += fit
                    done += fit
                if fit < g:
                    self._tidy(seg)
                    return done
                pos = y + s
            self._tidy(seg)
        return done

    def release(self, blocks: Runs) -> None:
        """Unpin blocks in the order given; a block unpinned now, or released again while unpinned,
        becomes the most recently used. Blocks not cached are skipped."""
        s = self.step
        runs = reversed(blocks.runs) if blocks.rev else blocks.runs
        asc = not blocks.rev
        for seg, a, b in runs:
            if asc:
                pos = a
                while pos <= b:
                    lst = self._ivs.get(seg)
                    if not lst:
                        break
                    i = bisect_right(lst, pos, key=_start) - 1
                    if i < 0 or lst[i].b < pos:            # not cached: up to the next interval
                        if i + 1 >= len(lst) or lst[i + 1].a > b:
                            break
                        pos = lst[i + 1].a
                        continue
                    lst, i = self._piece(seg, pos, b)
                    iv = lst[i]
                    pos = iv.b + s
                    self._unpin(seg, iv, asc)
            else:
                pos = b
                while pos >= a:
                    lst = self._ivs.get(seg)
                    if not lst:
                        break
                    i = bisect_right(lst, pos, key=_start) - 1
                    if i < 0:
                        break
                    if lst[i].b < pos:                      # not cached: down to the interval below
                        if lst[i].b < a:
                            break
                        pos = lst[i].b
                        continue
                    lst, i = self._piece_down(seg, pos, a)
                    iv = lst[i]
                    pos = iv.a - s
                    self._unpin(seg, iv, asc)
            self._tidy(seg)

    def resize(self, capacity_blocks: int) -> None:
        """A new capacity; evicts unpinned blocks beyond it, least recently used first."""
        self.capacity = max(0, capacity_blocks)
        over = min(self._n - self.capacity, self._nfree)
        if over > 0:
            self._evict(over)

    # ---- intervals ----

    @property
    def step(self) -> int:
        return self.block_tokens

    def _at(self, seg: Hashable, pos: int) -> _Iv | None:
        lst = self._ivs.get(seg)
        if not lst:
            return None
        i = bisect_right(lst, pos, key=_start) - 1
        return lst[i] if i >= 0 and lst[i].b >= pos else None

    def _run(self, blocks: Runs, prompt_tokens: int) -> int:
        # the hottest loop of a simulation with prefix caching (every replica's lookup on every routed call):
        # plain comparisons rather than min/max/len calls, the interval list walked without its key function
        runs = blocks.runs
        ivs = self._ivs
        if not runs or runs[0][0] not in ivs:
            return 0      # its first block's segment is not cached at all: no leading run
        s = self.block_tokens
        limit = (prompt_tokens - 1) // s    # max_hit_tokens, in blocks (at most prompt − 1 tokens)
        if limit > blocks._n:
            limit = blocks._n
        total = 0
        for seg, a, b in runs:
            if limit <= 0:
                break
            end = a + (limit - 1) * s
            if end > b:
                end = b
            want = (end - a) // s + 1
            lst = ivs.get(seg)
            pos = a
            if lst:
                n = len(lst)
                i = bisect_right(lst, pos, key=_start) - 1 if n > 1 else (0 if lst[0].a <= pos else -1)
                while pos <= end and 0 <= i < n:
                    iv = lst[i]
                    if iv.a <= pos <= iv.b:
                        pos = iv.b + s
                        i += 1
                    else:
                        break
            last = pos - s
            got = ((last if last < end else end) - a) // s + 1
            total += got
            if got < want:
                break
            limit -= want
        return total

    def _piece(self, seg: Hashable, pos: int, b: int) -> tuple[list[_Iv], int]:
        """The interval holding `pos`, cut to start at `pos` and end at `b` at the latest."""
        lst = self._ivs[seg]
        i = bisect_right(lst, pos, key=_start) - 1
        if lst[i].a < pos:
            self._split(seg, lst, i, pos)
            i += 1
        if lst[i].b > b:
            self._split(seg, lst, i, b + self.step)
        return lst, i

    def _piece_down(self, seg: Hashable, pos: int, a: int) -> tuple[list[_Iv], int]:
        """The interval holding `pos`, cut to end at `pos` and start at `a` at the earliest."""
        lst = self._ivs[seg]
        i = bisect_right(lst, pos, key=_start) - 1
        if lst[i].b > pos:
            self._split(seg, lst, i, pos + self.step)
        if lst[i].a < a:
            self._split(seg, lst, i, a)
            i += 1
        return lst, i

    def _split(self, seg: Hashable, lst: list[_Iv], i: int, x: int) -> None:
        """Cut lst[i] before position x (its a < x ≤ its b); an unpinned one's chunk is cut alike."""
        iv = lst[i]
        right = _Iv(x, iv.b, iv.p)
        iv.b = x - self.step
        lst.insert(i + 1, right)
        node = iv.node
        if node is not None:        # the older part keeps the node, the newer follows it
            new = _Node(seg, None, node.asc)
            if node.asc:
                new.iv, right.node = right, new
            else:
                node.iv, iv.node = right, None
                right.node = node
                new.iv, iv.node = iv, new
            new.prev, new.next = node, node.next
            node.next.prev = new
            node.next = new

    def _add(self, seg: Hashable, iv: _Iv) -> None:
        lst = self._ivs.setdefault(seg, [])
        lst.insert(bisect_right(lst, iv.a, key=_start), iv)

    def _unlink(self, iv: _Iv) -> None:
        """An unpinned interval is pinned: out of the LRU order."""
        node = iv.node
        assert node is not None
        node.prev.next, node.next.prev = node.next, node.prev
        iv.node = None
        self._nfree -= (iv.b - iv.a) // self.step + 1

    def _unpin(self, seg: Hashable, iv: _Iv, asc: bool) -> None:
        if iv.p > 1:
            iv.p -= 1
            return
        if iv.p == 0:                # released again while unpinned: refreshed
            self._unlink(iv)
        iv.p = 0
        self._nfree += (iv.b - iv.a) // self.step + 1
        tail = self._lru.prev
        s = self.step
        if tail is not self._lru and tail.seg == seg and tail.asc == asc and \
                ((asc and tail.iv.b + s == iv.a) or (not asc and tail.iv.a == iv.b + s)):
            # it continues the newest chunk: one chunk, one interval
            lst = self._ivs[seg]
            lst.pop(bisect_right(lst, iv.a, key=_start) - 1)
            if asc:
                tail.iv.b = iv.b
            else:
                tail.iv.a = iv.a
            return
        node = _Node(seg, iv, asc)
        iv.node = node
        node.prev, node.next = tail, self._lru
        tail.next = node
        self._lru.prev = node

    def _evict(self, k: int) -> None:
        """Evict the `k` least recently used unpinned blocks."""
        s = self.step
        self.stats.evictions += k
        self._n -= k
        self._nfree -= k
        while k > 0:
            node = self._lru.next
            iv = node.iv
            c = (iv.b - iv.a) // s + 1
            if c <= k:
                node.prev.next, node.next.prev = node.next, node.prev
                lst = self._ivs[node.seg]
                lst.pop(bisect_right(lst, iv.a, key=_start) - 1)
                if not lst:
                    del self._ivs[node.seg]
                k -= c
            else:
                if node.asc:
                    iv.a += k * s
                else:
                    iv.b -= k * s
                k = 0

    def _tidy(self, seg: Hashable) -> None:
        """Join neighbouring pinned intervals of one pin count (fewer intervals, the same state)."""
        lst = self._ivs.get(seg)
        if not lst or len(lst) < 2:
            return
        s = self.step
        out = [lst[0]]
        for iv in lst[1:]:
            last = out[-1]
            if iv.p and iv.p == last.p and last.b + s == iv.a:
                last.b = iv.b
            else:
                out.append(iv)
        if len(out) < len(lst):
            lst[:] = out
