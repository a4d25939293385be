"""Which replica gets a call: least outstanding per unit of weight, ties round-robin; one FIFO per LLM when all are full.

A replica's load is `(outstanding + 1) / weight`: what it would carry with this call, per unit of its
weight (the endpoints file's `weight`, its capacity relative to its siblings; 1 unless the LLM is a
mixed group of unlike replicas). The free replica of least load gets the call, so unlike replicas
fill in proportion to their weights (3:1 weights hold 3:1 outstanding calls); with equal weights this is
exactly least outstanding, as before weights.

A pool is an LLM key of the endpoints file; its aliases are other names for the same pool.

The same policy as the simulator's gateway (sim/), so measured and simulated queueing agree.

A replica removed from the file drains: it takes no new calls and its state (the in-flight count)
lives on until its last call ends, so `draining()` tells when it may be stopped. A call that finds
no replica to take it (the pool is empty while engines restart, or every replica refused a
connection a moment ago) waits under its `Hold` instead of failing: until a replica appears, a
down period passes, or `hold_s` runs out (counted from the first time it found none, across its
retries). A call queued because every replica is full waits without a limit, as before.

Prefix affinity (`affinity=True`): a call of workflow request R to LLM L goes back to the replica that
served R's previous call to L — which holds R's prompt prefix in its cache — while that replica has a
free slot and its load is at most the least-loaded free replica's plus `affinity_slack` calls (default
8) or `affinity_ratio` times it (default 1.5) (`perf.prefix.affine_ok`: `home.load() <= max(best.load()
+ slack / best.weight, ratio * best.load())`, the slack counted in calls of the least-loaded replica);
else the least-loaded one as above (and R's affinity moves there). A call that leaves its replica
prefills its whole context again, which loads the pool more and makes more calls leave: the slack
of one call this had before collapsed a ReAct agent on five replicas under load (perf.prefix). The
table is an LRU of at most `max_affinity` (request, LLM) entries; entries of a replica that leaves the
file are dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

from scepsy_hpc.gateway.endpoints import Endpoints, EndpointsWatcher
from scepsy_hpc.perf.prefix import DEFAULT_AFFINITY_RATIO, DEFAULT_AFFINITY_SLACK, affine_ok

MAX_AFFINITY = 100_000


class NoReplicaError(Exception):
    """No replica can take this call (none configured, all tried, all down, its hold ran out, or the LLM was removed).

    `exhausted`: every replica was excluded (tried already), so waiting cannot help. `retry_at`: every
    replica left is marked down; the first may be tried again at this monotonic time. `held_s`: the
    call waited its whole hold of this many seconds first."""

    def __init__(self, message: str, *, exhausted: bool = False, retry_at: float | None = None,
                 held_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exhausted = exhausted
        self.retry_at = retry_at
        self.held_s = held_s


@dataclass(eq=False)
class Hold:
    """One call's allowance for waiting while no replica can take it, shared by all its attempts.

    The clock starts the first time the call finds no replica and never restarts, so a replica that
    keeps refusing connections ends the call after `hold_s`, however many times it was retried."""

    hold_s: float
    since: float | None = None  # monotonic


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
    # `Bearer <the engine's secret>` (the endpoints file's `api_key`), sent as Authorization on every call
    # to it; follows the file on reload. Never in a repr, a log line or an error message.
    authorization: str | None = field(default=None, repr=False)
    weight: float = 1.0   # its share of the LLM's calls relative to its siblings (the file's `weight`)

    def load(self) -> float:
        """Outstanding calls with one more, per unit of weight: the router gives a call to the least."""
        return (self.outstanding + 1) / self.weight


@dataclass(eq=False)
class _Waiter:
    fut: asyncio.Future[ReplicaState]
    exclude: frozenset[str]
    avoid_down: bool = False
    request: str | None = None   # the workflow request (prefix affinity)  # a retry after a refused connection: only a replica not marked down will do
    hold: Hold | None = None
    held: bool = False  # waiting for a replica to appear or come up (not for a slot of a full one)
    wake_at: float | None = None  # monotonic: look again then (a down period or the hold ends)
    timer: asyncio.TimerHandle | None = None

    def wake(self, at: float | None, callback: Callable[[], None]) -> None:
        """Call `callback` at monotonic time `at` (None: never), replacing the previous timer."""
        if at == self.wake_at:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.wake_at = at
        if at is not None:
            self.timer = asyncio.get_running_loop().call_later(max(0.0, at - time.monotonic()), callback)


@dataclass(eq=False)
class LLMPool:
    """The replicas of one LLM (in file order) and the calls waiting for a free slot."""

    name: str
    served_model: str
    replicas: list[ReplicaState] = field(default_factory=list)
    waiters: deque[_Waiter] = field(default_factory=deque)
    rr: int = 0

    def queue_length(self) -> int:
        """Calls waiting for a slot of a full replica."""
        return sum(1 for w in self.waiters if not w.fut.done() and not w.held)

    def held_count(self) -> int:
        """Calls holding: waiting for a replica to appear in the file or to come back up."""
        return sum(1 for w in self.waiters if not w.fut.done() and w.held)


class Router:
    """Routes calls of each LLM to its replicas; follows the endpoints source on every `sync()`."""

    def __init__(self, source: Endpoints | EndpointsWatcher, *, down_for_s: float = 1.0, affinity: bool = False,
                 affinity_slack: int = DEFAULT_AFFINITY_SLACK, affinity_ratio: float = DEFAULT_AFFINITY_RATIO,
                 max_affinity: int = MAX_AFFINITY) -> None:
        if affinity_slack < 0:
            raise ValueError(f"affinity_slack={affinity_slack} must be >= 0 (extra calls a request's replica may carry "
                             "over the least-loaded one, counted in the least-loaded one's calls)")
        if not affinity_ratio >= 0:
            raise ValueError(f"affinity_ratio={affinity_ratio} must be >= 0 (how many times the least-loaded replica's "
                             "load a request's replica may carry; 0: the slack alone decides)")
        self.source = source
        self.affinity = affinity
        self.affinity_slack = affinity_slack
        self.affinity_ratio = affinity_ratio
        self.max_affinity = max_affinity
        # (LLM key, request id) -> URL of the replica that served the request's last call to the LLM; LRU
        self._affinity: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.affinity_hits = 0     # calls sent back to their request's replica
        self.affinity_misses = 0   # calls of a known request that went elsewhere (its replica busy or gone)
        self.down_for_s = down_for_s
        self._pools: dict[str, LLMPool] = {}
        self._by_name: dict[str, LLMPool] = {}  # keys and aliases
        self._states: dict[tuple[str, str], ReplicaState] = {}
        self._applied: Endpoints | None = None
        self.client_keys = False  # the file has an `auth` section: a client's Authorization is its key, never forwarded
        self.held_calls: dict[str, int] = {}     # per LLM key: calls that had to hold
        self.hold_timeouts: dict[str, int] = {}  # per LLM key: held calls whose hold ran out

    # -- configuration ---------------------------------------------------------------------------

    def endpoints(self, *, force: bool = False) -> Endpoints:
        """The endpoints in force (polling the watcher, rate-limited unless `force`)."""
        return self.source.poll(force=force) if isinstance(self.source, EndpointsWatcher) else self.source

    def sync(self, *, force: bool = False) -> None:
        """Apply the source's endpoints if they changed since the last call (`force`: look at the file now,
        not at most once per poll interval)."""
        eps = self.endpoints(force=force)
        if eps is not self._applied:
            self.apply(eps)

    def apply(self, eps: Endpoints) -> None:
        """Reconcile pools with `eps`: removed replicas take no new calls, in-flight ones finish."""
        self._applied = eps
        self.client_keys = eps.auth is not None
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
                st.cap, st.active, st.weight = spec.cap(rep), True, rep.weight
                st.authorization = f"Bearer {rep.api_key}" if rep.api_key else None
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
        if self._affinity:
            live = {(st.llm, st.url) for st in self._states.values() if st.active}
            for k in [k for k, url in self._affinity.items() if (k[0], url) not in live]:
                del self._affinity[k]
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

    def draining(self) -> list[ReplicaState]:
        """Replicas removed from the endpoints file with calls still in flight (streams included)."""
        return [st for st in self._states.values() if not st.active and st.outstanding > 0]

    def replica_states(self, pool: LLMPool) -> list[ReplicaState]:
        """The pool's replicas in file order, then its draining ones."""
        return pool.replicas + [st for st in self.draining() if st.llm == pool.name]

    # -- acquire / release -----------------------------------------------------------------------

    def _pick(self, pool: LLMPool, exclude: frozenset[str], avoid_down: bool = False,
              request: str | None = None) -> ReplicaState | None:
        """The free replica of least load (outstanding per unit of weight; round-robin among equals), or None if
        all are full.

        A replica marked down is a last resort, and with `avoid_down` no choice at all. Raises
        NoReplicaError when no replica could take the call now: none in the file, all excluded, or
        (with `avoid_down`) all marked down."""
        n = len(pool.replicas)
        if n == 0:
            raise NoReplicaError(f"llm {pool.name!r} has no replicas in the endpoints file")
        now = time.monotonic()
        best: ReplicaState | None = None
        best_i = -1
        fallback: ReplicaState | None = None  # a free replica that is marked down
        fallback_i = -1
        candidates = 0
        up = 0  # candidates not marked down, free or full
        first_up_at = float("inf")  # when the first candidate marked down may be tried again
        for k in range(n):
            i = (pool.rr + k) % n
            r = pool.replicas[i]
            if r.url in exclude:
                continue
            candidates += 1
            if r.down_until > now:
                first_up_at = min(first_up_at, r.down_until)
            else:
                up += 1
            if r.outstanding >= r.cap:
                continue
            if r.down_until > now:
                if fallback is None or r.load() < fallback.load():
                    fallback, fallback_i = r, i
            elif best is None or r.load() < best.load():
                best, best_i = r, i
        if candidates == 0:
            raise NoReplicaError(f"llm {pool.name!r}: every replica was tried", exhausted=True)
        if avoid_down and up == 0:
            raise NoReplicaError(f"llm {pool.name!r}: every replica refused a connection in the last "
                                 f"{self.down_for_s:g} s", retry_at=first_up_at)
        if best is None and not avoid_down:
            best, best_i = fallback, fallback_i
        if best is not None and request is not None and self.affinity:
            return self._affine(pool, request, best, best_i, exclude, now)
        if best is not None:
            pool.rr = best_i + 1
        return best

    def _affine(self, pool: LLMPool, request: str, best: ReplicaState, best_i: int, exclude: frozenset[str],
                now: float) -> ReplicaState:
        """`request`'s replica when it may take the call within the slack, else `best`; remembered either way."""
        key = (pool.name, request)
        url = self._affinity.get(key)
        pick = best
        if url is not None:
            home = next((r for r in pool.replicas if r.url == url), None)
            if (home is not None and home.url not in exclude and home.down_until <= now and home.outstanding < home.cap
                    and affine_ok(home.load(), best.load(), best.weight, self.affinity_slack, self.affinity_ratio)):
                pick = home
                self.affinity_hits += 1
            else:
                self.affinity_misses += 1
            self._affinity.move_to_end(key)
        if pick is best:
            pool.rr = best_i + 1
        self._affinity[key] = pick.url
        while len(self._affinity) > self.max_affinity:
            self._affinity.popitem(last=False)
        return pick

    def affinity_size(self) -> int:
        """(request, LLM) entries in the affinity table."""
        return len(self._affinity)

    def forget(self, request: str) -> None:
        """`request` ended: drop its affinity entries (one per LLM it called)."""
        for name in self._pools:
            self._affinity.pop((name, request), None)

    def _hold_or_fail(self, pool: LLMPool, w: _Waiter, exc: NoReplicaError, now: float) -> NoReplicaError | None:
        """None when `w` may wait for a replica (then `w.wake_at` says when to look again); else its error."""
        h = w.hold
        if h is None or h.hold_s <= 0 or exc.exhausted:
            return exc
        if h.since is None:
            h.since = now
            self.held_calls[pool.name] = self.held_calls.get(pool.name, 0) + 1
        deadline = h.since + h.hold_s
        if now >= deadline:
            self.hold_timeouts[pool.name] = self.hold_timeouts.get(pool.name, 0) + 1
            why = "every replica refused connections" if exc.retry_at is not None else "the endpoints file lists none"
            return NoReplicaError(f"waited {h.hold_s:g} s for a replica of llm {pool.name!r}; {why}", held_s=h.hold_s)
        w.held = True
        w.wake(deadline if exc.retry_at is None else min(deadline, exc.retry_at), lambda: self._look_again(pool, w))
        return None

    @staticmethod
    def _take(r: ReplicaState) -> ReplicaState:
        r.outstanding += 1
        r.calls += 1
        return r

    async def acquire(self, pool: LLMPool, exclude: frozenset[str] = frozenset(), *, avoid_down: bool = False,
                      hold: Hold | None = None, request: str | None = None) -> ReplicaState:
        """A replica slot for one call of `pool`: waits in the LLM's FIFO when all replicas are full, and
        under `hold` while none can take it (see the module docstring); NoReplicaError when it cannot wait."""
        if self._pools.get(pool.name) is not pool:  # a retry of a call whose LLM was removed meanwhile
            raise NoReplicaError(f"llm {pool.name!r} was removed from the endpoints file while this call was in flight")
        try:
            # affinity only for a call that is handed the pick now (with a queue, it waits its turn)
            picked = self._pick(pool, exclude, avoid_down, None if pool.waiters else request)
        except NoReplicaError as exc:
            w = _Waiter(asyncio.get_running_loop().create_future(), exclude, avoid_down, request, hold)
            err = self._hold_or_fail(pool, w, exc, time.monotonic())
            if err is not None:
                raise err from None
        else:
            if picked is not None and not pool.waiters:  # FIFO: nobody overtakes a queued call
                return self._take(picked)   # the common case: no future, no waiter
            w = _Waiter(asyncio.get_running_loop().create_future(), exclude, avoid_down, request, hold)
        pool.waiters.append(w)
        self._dispatch(pool)
        try:
            return await w.fut
        except asyncio.CancelledError:
            # The caller went away: hand back a slot granted in the same instant, and leave the queue.
            if w.fut.done() and not w.fut.cancelled() and w.fut.exception() is None:
                self.release(w.fut.result())
            self._drop(pool, w)
            raise
        finally:
            w.wake(None, lambda: None)

    def _look_again(self, pool: LLMPool, w: _Waiter) -> None:
        """`w`'s timer ran out (a down period or its hold ended): serve the queue, then settle `w` itself."""
        if w.fut.done():
            return
        w.timer = w.wake_at = None
        self._dispatch(pool)
        if w.fut.done():
            return
        try:
            r = self._pick(pool, w.exclude, w.avoid_down, w.request)
        except NoReplicaError as exc:
            err = self._hold_or_fail(pool, w, exc, time.monotonic())
            if err is not None:
                w.fut.set_exception(err)
                self._drop(pool, w)
            return
        if r is not None:  # free, yet not handed out: `w` sat behind a waiter that wants another replica
            w.fut.set_result(self._take(r))
            self._drop(pool, w)
            return
        w.held = False  # queued for a slot now: a release wakes it

    @staticmethod
    def _drop(pool: LLMPool, w: _Waiter) -> None:
        try:
            pool.waiters.remove(w)
        except ValueError:
            pass

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
        """`r` answered: route to it normally again (calls holding for it go at once)."""
        if r.down_until == 0.0:
            return   # the common case, on every call: it was not down
        was_down = r.down_until > time.monotonic()
        r.down_until = 0.0
        pool = self._pools.get(r.llm)
        if was_down and pool is not None and pool.waiters and r.active:
            self._dispatch(pool)

    def _dispatch(self, pool: LLMPool) -> None:
        """Hand free slots to waiters in FIFO order; a waiter that can find no replica holds or fails."""
        while pool.waiters and pool.waiters[0].fut.done():
            pool.waiters.popleft()
        if not pool.waiters:
            return
        if pool.replicas and all(r.outstanding >= r.cap for r in pool.replicas):
            return  # the common case under load: nothing free, so no waiter can move
        now = time.monotonic()
        waiting, remaining = pool.waiters, deque[_Waiter]()
        while waiting:
            w = waiting.popleft()
            if w.fut.done():
                continue
            try:
                r = self._pick(pool, w.exclude, w.avoid_down, w.request)
            except NoReplicaError as exc:
                err = self._hold_or_fail(pool, w, exc, now)
                if err is None:
                    remaining.append(w)
                else:
                    w.fut.set_exception(err)
                continue
            if r is not None:
                w.fut.set_result(self._take(r))
                continue
            w.held = False
            w.wake(None, lambda: None)
            remaining.append(w)
            if not w.exclude and not w.avoid_down:
                break  # every replica is full, so no later waiter can move either
        remaining.extend(waiting)
        pool.waiters = remaining
