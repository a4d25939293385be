"""Which replica gets a call: least outstanding, ties round-robin; one FIFO per LLM when all are full.

A pool is an LLM key of the endpoints file; its aliases are other names for the same pool.

The same policy as the simulator's gateway (sim/), so measured and simulated queueing agree.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from scepsy_hpc.gateway.endpoints import Endpoints, EndpointsWatcher


class NoReplicaError(Exception):
    """No replica can take this call (none configured, all tried, or the LLM was removed)."""

    def __init__(self, message: str, *, exhausted: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.exhausted = exhausted


@dataclass(eq=False)
class ReplicaState:
    """One replica's live counters; survives reloads that keep its URL, so in-flight counts stay right."""

    llm: str
    url: str
    cap: int
    outstanding: int = 0
    active: bool = True
    calls: int = 0
    connect_failures: int = 0
    # Monotonic seconds until which a replica that refused a connection is tried only as a last resort:
    # an idle dead replica has the fewest outstanding calls and would otherwise be picked every time.
    down_until: float = 0.0


@dataclass(eq=False)
class _Waiter:
    fut: asyncio.Future[ReplicaState]
    exclude: frozenset[str]


@dataclass(eq=False)
class LLMPool:
    """The replicas of one LLM (in file order) and the calls waiting for a free slot."""

    name: str
    served_model: str
    replicas: list[ReplicaState] = field(default_factory=list)
    waiters: deque[_Waiter] = field(default_factory=deque)
    rr: int = 0

    def queue_length(self) -> int:
        """Calls waiting for a slot."""
        return sum(1 for w in self.waiters if not w.fut.done())


class Router:
    """Routes calls of each LLM to its replicas; follows the endpoints source on every `sync()`."""

    def __init__(self, source: Endpoints | EndpointsWatcher, *, down_for_s: float = 1.0) -> None:
        self.source = source
        self.down_for_s = down_for_s
        self._pools: dict[str, LLMPool] = {}
        self._by_name: dict[str, LLMPool] = {}  # keys and aliases
        self._states: dict[tuple[str, str], ReplicaState] = {}
        self._applied: Endpoints | None = None

    # -- configuration ---------------------------------------------------------------------------

    def endpoints(self) -> Endpoints:
        """The endpoints in force (polling the watcher, rate-limited)."""
        return self.source.poll() if isinstance(self.source, EndpointsWatcher) else self.source

    def sync(self) -> None:
        """Apply the source's endpoints if they changed since the last call."""
        eps = self.endpoints()
        if eps is not self._applied:
            self.apply(eps)

    def apply(self, eps: Endpoints) -> None:
        """Reconcile pools with `eps`: removed replicas take no new calls, in-flight ones finish."""
        self._applied = eps
        for name, spec in eps.llms.items():
            pool = self._pools.get(name)
            if pool is None:
                pool = self._pools[name] = LLMPool(name, spec.served_model or name)
            pool.served_model = spec.served_model or name
            keep: list[ReplicaState] = []
            for rep in spec.replicas:
                st = self._states.get((name, rep.url))
                if st is None:
                    st = self._states[(name, rep.url)] = ReplicaState(name, rep.url, spec.cap(rep))
                st.cap, st.active = spec.cap(rep), True
                keep.append(st)
            for old in pool.replicas:
                if old not in keep:
                    old.active = False
            pool.replicas = keep
            self._dispatch(pool)
        for name in [n for n in self._pools if n not in eps.llms]:
            pool = self._pools.pop(name)
            for st in pool.replicas:
                st.active = False
            for w in pool.waiters:
                if not w.fut.done():
                    w.fut.set_exception(NoReplicaError(
                        f"llm {name!r} was removed from the endpoints file while this call waited"))
            pool.waiters.clear()
        for key in [k for k, st in self._states.items() if not st.active and st.outstanding == 0]:
            del self._states[key]
        self._by_name = {name: self._pools[key] for name, key in eps.accepted_names().items()}

    # -- lookups ---------------------------------------------------------------------------------

    def pool(self, name: str) -> LLMPool | None:
        """The pool of an LLM key or alias, or None when unknown."""
        return self._by_name.get(name)

    def names(self) -> list[str]:
        """Known LLM keys, sorted."""
        return sorted(self._pools)

    def accepted_names(self) -> dict[str, str]:
        """Every name a call may give (keys and aliases) → its LLM key, sorted by name."""
        return {name: pool.name for name, pool in self._by_name.items()}

    def pools(self) -> list[LLMPool]:
        """Every pool, by name."""
        return [self._pools[n] for n in sorted(self._pools)]

    # -- acquire / release -----------------------------------------------------------------------

    def _pick(self, pool: LLMPool, exclude: frozenset[str]) -> ReplicaState | None:
        """The free replica with the fewest outstanding calls (round-robin among equals), or None if all are full."""
        n = len(pool.replicas)
        if n == 0:
            raise NoReplicaError(f"llm {pool.name!r} has no replicas in the endpoints file")
        now = time.monotonic()
        best: ReplicaState | None = None
        best_i = -1
        fallback: ReplicaState | None = None  # a free replica that is marked down
        fallback_i = -1
        candidates = 0
        for k in range(n):
            i = (pool.rr + k) % n
            r = pool.replicas[i]
            if r.url in exclude:
                continue
            candidates += 1
            if r.outstanding >= r.cap:
                continue
            if r.down_until > now:
                if fallback is None or r.outstanding < fallback.outstanding:
                    fallback, fallback_i = r, i
            elif best is None or r.outstanding < best.outstanding:
                best, best_i = r, i
        if candidates == 0:
            raise NoReplicaError(f"llm {pool.name!r}: every replica was tried", exhausted=True)
        if best is None:
            best, best_i = fallback, fallback_i
        if best is not None:
            pool.rr = best_i + 1
        return best

    @staticmethod
    def _take(r: ReplicaState) -> ReplicaState:
        r.outstanding += 1
        r.calls += 1
        return r

    async def acquire(self, pool: LLMPool, exclude: frozenset[str] = frozenset()) -> ReplicaState:
        """A replica slot for one call of `pool` (waits in the LLM's FIFO when all replicas are full)."""
        picked = self._pick(pool, exclude)  # raises when no replica could ever take the call
        if picked is not None and not pool.waiters:  # FIFO: nobody overtakes a queued call
            return self._take(picked)
        w = _Waiter(asyncio.get_running_loop().create_future(), exclude)
        pool.waiters.append(w)
        self._dispatch(pool)
        try:
            return await w.fut
        except asyncio.CancelledError:
            # The caller went away: hand back a slot granted in the same instant, and leave the queue.
            if w.fut.done() and not w.fut.cancelled() and w.fut.exception() is None:
                self.release(w.fut.result())
            try:
                pool.waiters.remove(w)
            except ValueError:
                pass
            raise

    def release(self, r: ReplicaState) -> None:
        """Give a slot back; the first waiter of the LLM that this frees gets it."""
        r.outstanding -= 1
        pool = self._pools.get(r.llm)
        if pool is not None and pool.waiters:
            self._dispatch(pool)
        if not r.active and r.outstanding == 0 and self._states.get((r.llm, r.url)) is r:
            del self._states[(r.llm, r.url)]

    def mark_down(self, r: ReplicaState) -> None:
        """A connection to `r` failed: prefer its siblings for a while."""
        r.connect_failures += 1
        r.down_until = time.monotonic() + self.down_for_s

    def mark_up(self, r: ReplicaState) -> None:
        """`r` answered: route to it normally again."""
        r.down_until = 0.0

    def _dispatch(self, pool: LLMPool) -> None:
        """Hand free slots to waiters in FIFO order."""
        while pool.waiters and pool.waiters[0].fut.done():
            pool.waiters.popleft()
        if not pool.waiters:
            return
        if pool.replicas and all(r.outstanding >= r.cap for r in pool.replicas):
            return  # the common case under load: nothing free, so no waiter can move
        waiting, remaining = pool.waiters, deque[_Waiter]()
        while waiting:
            w = waiting.popleft()
            if w.fut.done():
                continue
            try:
                r = self._pick(pool, w.exclude)
            except NoReplicaError as exc:
                w.fut.set_exception(exc)
                continue
            if r is not None:
                w.fut.set_result(self._take(r))
                continue
            remaining.append(w)
            if not w.exclude:
                break  # every replica is full, so no later waiter can move either
        remaining.extend(waiting)
        pool.waiters = remaining
