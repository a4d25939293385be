"""The request cap: at most N workflow requests of a deployment in flight at once.

Past its capacity a deployment whose calls continue conversations on a prefix cache collapses: the
requests in flight multiply until their histories no longer fit the KV cache, every call prefills its
whole history again, and the capacity falls further (README roadmap 3; `sim.core` models the cap).
Holding new requests at the gateway once about capacity × latency are in flight (Little's law at the
plan's capacity: the plan's `predicted.max_requests`) keeps the deployment at its capacity instead.

A request is known by the id its calls carry (`X-Scepsy-Request`, or the `/r/{id}` path prefix). Its
first call admits it when fewer than the cap are in flight and none wait; otherwise the call waits,
first come first served, and its request's later calls (a fan-out's siblings) wait with it and go
together. The gateway sees no request's end unless the client reports it (a `request` span's end, as
`scepsy drive` and the tracing helpers send), so a request with no call in flight for `idle_s` has
ended too: its slot is given to the next waiting request. Its calls after that (a tool that ran longer)
are admitted at once, never held behind new requests, from a bounded memory of such requests.

Calls with no request id are not capped (there is nothing to count them by) and are counted as
`uncapped_calls`. A call that waits longer than `wait_s`, or finds `MAX_WAITING_PER_SLOT` × the cap
requests already waiting, is refused with a 503 and `Retry-After`. Times are wall seconds here; the
gateway gives model seconds × its time scale.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Mapping

DEFAULT_IDLE_S = 60.0     # model seconds with no call in flight after which a request counts as ended
DEFAULT_WAIT_S = 600.0    # model seconds a new request may wait for a slot (the openai SDK's own timeout)
MAX_WAITING_PER_SLOT = 10  # requests that may wait, per unit of the cap: bounds what a flood makes the gateway hold
RECENT_PER_SLOT = 4        # requests remembered (per unit of the cap) after their idle end, so their next call goes in


@dataclass(frozen=True)
class Refusal:
    """Why a call was not admitted: the 503's message and its `Retry-After` seconds."""

    message: str
    retry_after_s: int


@dataclass(eq=False)
class _Active:
    calls: int       # calls of the request in flight
    last_s: float    # when its last call ended (or it was admitted)
    ended: bool = False   # its end was reported while a call was still in flight


@dataclass(eq=False)
class Scope:
    """One capped scope (a deployment): its requests in flight, those waiting, and counters."""

    cap: int
    active: dict[str, _Active] = field(default_factory=dict)
    # request id -> the futures of its calls waiting, in the order the requests came
    waiting: OrderedDict[str, list[asyncio.Future[None]]] = field(default_factory=OrderedDict)
    recent: OrderedDict[str, None] = field(default_factory=OrderedDict)   # ended idle; their next call goes in
    admitted: int = 0        # requests admitted (at once or after waiting)
    waited: int = 0          # of them, those that waited for a slot
    wait_timeouts: int = 0   # requests refused after waiting wait_s
    queue_full: int = 0      # requests refused at once: too many waiting
    idle_ended: int = 0      # requests taken as ended by idleness (no request-span end seen)
    readmitted: int = 0      # calls of a request after its idle end, let in at once

    def stats(self) -> dict[str, int]:
        """The scope's figures now (`GET /scepsy/v1/stats`)."""
        return {"max_requests": self.cap, "in_flight": len(self.active), "waiting": len(self.waiting),
                "admitted": self.admitted, "waited": self.waited, "wait_timeouts": self.wait_timeouts,
                "queue_full": self.queue_full, "idle_ended": self.idle_ended, "readmitted": self.readmitted}


class Admission:
    """The request caps of one gateway, per scope (a deployment's name; None for LLMs with no deployment)."""

    def __init__(self, *, idle_s: float = DEFAULT_IDLE_S, wait_s: float = DEFAULT_WAIT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (0 < idle_s < math.inf and 0 < wait_s < math.inf):
            raise ValueError(f"idle_s={idle_s}, wait_s={wait_s}: both finite and > 0")
        self.idle_s = idle_s
        self.wait_s = wait_s
        self.clock = clock
        self.scopes: dict[str | None, Scope] = {}
        self.uncapped_calls = 0   # calls with no request id to a capped scope

    def configure(self, caps: Mapping[str | None, int]) -> None:
        """Apply the caps in force (the endpoints file's); a scope no longer capped lets every waiting call go."""
        for key in list(self.scopes):
            if key not in caps:
                sc = self.scopes.pop(key)
                for futs in sc.waiting.values():
                    _wake(futs)
        for key, cap in caps.items():
            sc = self.scopes.get(key)
            if sc is None:
                self.scopes[key] = Scope(cap)
            elif sc.cap != cap:
                sc.cap = cap
                self._grant(sc)   # a raised cap lets waiting requests in now

    async def enter(self, scope: str | None, request_id: str | None,
                    waiting: Callable[[bool], None] | None = None) -> Refusal | None:
        """Admit one call (None), or say why not; a call admitted must be followed by `leave` when it ends.
        `waiting(True)` is called when the call starts to wait, `waiting(False)` when it stops (whatever ends it)."""
        sc = self.scopes.get(scope)
        if sc is None:
            return None
        if request_id is None:
            self.uncapped_calls += 1
            return None
        now = self.clock()
        a = sc.active.get(request_id)
        if a is not None:
            a.calls += 1
            return None
        if request_id in sc.recent:   # ended by idleness and back: it is no new request
            del sc.recent[request_id]
            sc.active[request_id] = _Active(1, now)
            sc.readmitted += 1
            return None
        self._expire(sc, now)
        futs = sc.waiting.get(request_id)
        if futs is None:
            if len(sc.active) < sc.cap and not sc.waiting:
                sc.active[request_id] = _Active(1, now)
                sc.admitted += 1
                return None
            if len(sc.waiting) >= MAX_WAITING_PER_SLOT * sc.cap:
                sc.queue_full += 1
                return Refusal(f"{_name(scope)} is at its request cap ({sc.cap} requests in flight) and "
                               f"{len(sc.waiting)} more wait; send fewer requests at once, or raise the cap "
                               "(the plan's predicted.max_requests)", retry_after_s=max(1, math.ceil(self.idle_s)))
            futs = sc.waiting[request_id] = []
            sc.waited += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        futs.append(fut)
        if waiting is None:
            return await self._wait(sc, scope, request_id, fut, now + self.wait_s)
        waiting(True)
        try:
            return await self._wait(sc, scope, request_id, fut, now + self.wait_s)
        finally:
            waiting(False)

    async def _wait(self, sc: Scope, scope: str | None, request_id: str, fut: asyncio.Future[None],
                    deadline: float) -> Refusal | None:
        try:
            while not fut.done():
                now = self.clock()
                if now >= deadline:
                    self._drop_waiter(sc, request_id, fut)
                    sc.wait_timeouts += 1
                    return Refusal(f"{_name(scope)} is at its request cap ({sc.cap} requests in flight); this "
                                   f"request waited {self.wait_s:.0f} s for one to end. The deployment is past its "
                                   "capacity: send fewer requests, or give it more GPUs",
                                   retry_after_s=max(1, math.ceil(self.idle_s)))
                wake = min(deadline, self._next_expiry(sc, now))
                try:
                    await asyncio.wait_for(asyncio.shield(fut), timeout=max(wake - now, 0.0))
                except (asyncio.TimeoutError, TimeoutError):
                    self._expire(sc, self.clock())
        except asyncio.CancelledError:   # the client went away while waiting, or the gateway stops
            self._drop_waiter(sc, request_id, fut)
            if fut.done() and not fut.cancelled() and self.scopes.get(scope) is sc:
                self.leave(scope, request_id)   # admitted just as it went: its call never runs
            raise
        return None

    def leave(self, scope: str | None, request_id: str | None) -> None:
        """One admitted call ended."""
        sc = self.scopes.get(scope)
        if sc is None or request_id is None:
            return
        a = sc.active.get(request_id)
        if a is not None:
            a.calls = max(0, a.calls - 1)
            a.last_s = self.clock()
            if a.ended and a.calls == 0:
                del sc.active[request_id]
                self._grant(sc)

    def end(self, request_id: str, allowed: Callable[[str | None], bool] = lambda _s: True) -> None:
        """The client reported the request's end: its slot goes to the next waiting request (in the scopes
        `allowed`, those the reporting key may call)."""
        for key, sc in self.scopes.items():
            if not allowed(key):
                continue
            sc.recent.pop(request_id, None)
            a = sc.active.get(request_id)
            if a is None:
                continue
            if a.calls:
                a.ended = True   # its slot goes when its last call ends
            else:
                del sc.active[request_id]
                self._grant(sc)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per capped scope its figures (the scope None is named ``""``)."""
        now = self.clock()
        for sc in self.scopes.values():
            self._expire(sc, now)
        return {"" if k is None else k: sc.stats() for k, sc in sorted(self.scopes.items(), key=lambda kv: kv[0] or "")}

    def _next_expiry(self, sc: Scope, now: float) -> float:
        idle = [a.last_s for a in sc.active.values() if a.calls == 0]
        return min(idle) + self.idle_s if idle else now + self.idle_s

    def _expire(self, sc: Scope, now: float) -> None:
        gone = [rid for rid, a in sc.active.items() if a.calls == 0 and now - a.last_s >= self.idle_s]
        for rid in gone:
            del sc.active[rid]
            sc.idle_ended += 1
            sc.recent[rid] = None
        while len(sc.recent) > RECENT_PER_SLOT * sc.cap:
            sc.recent.popitem(last=False)
        if gone:
            self._grant(sc)

    def _grant(self, sc: Scope) -> None:
        while sc.waiting and len(sc.active) < sc.cap:
            rid, futs = sc.waiting.popitem(last=False)
            live = [f for f in futs if not f.done()]
            if not live:
                continue
            sc.active[rid] = _Active(len(live), self.clock())
            sc.admitted += 1
            _wake(live)

    @staticmethod
    def _drop_waiter(sc: Scope, request_id: str, fut: asyncio.Future[None]) -> None:
        futs = sc.waiting.get(request_id)
        if futs is None:
            return
        if fut in futs:
            futs.remove(fut)
        if not futs:
            del sc.waiting[request_id]


def _wake(futs: list[asyncio.Future[None]]) -> None:
    for f in futs:
        if not f.done():
            f.set_result(None)


def _name(scope: str | None) -> str:
    return f"deployment {scope!r}" if scope is not None else "this gateway"
