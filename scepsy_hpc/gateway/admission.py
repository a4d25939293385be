"""The request cap: at most N workflow requests of a deployment in flight at once.

Past its capacity a deployment whose calls continue conversations on a prefix cache can collapse: the
requests in flight multiply until their histories no longer fit the KV cache, every call prefills its
whole history again, and the capacity falls further (README roadmap 3; `sim.core` models the cap).
Holding new requests at the gateway once about capacity × latency are in flight (Little's law near the
plan's capacity: the plan's `predicted.max_requests`) keeps the deployment at its capacity instead.

A request is known by the id its calls carry (`X-Scepsy-Request`, or the `/r/{id}` path prefix). Its
first call admits it when fewer than the cap are in flight and none wait; otherwise the call waits,
first come first served, and its request's later calls (a fan-out's siblings) wait with it and go
together. The gateway sees no request's end unless the client reports it (a `request` span's end, as
`scepsy drive` and the tracing helpers send), so a request with no call in flight for `idle_s` has
ended too: its slot is given to the next waiting request. Its calls after that (a tool that ran longer)
are let in at once, never held behind new requests, from a bounded memory (`RECENT_PER_SLOT` × the cap)
of such requests: so besides the N, up to that many requests back from an idle end may be in flight.

Calls with no request id are not capped (there is nothing to count them by) and are counted as
`uncapped_calls`. A call that waits longer than `wait_s`, or finds `MAX_WAITING_PER_SLOT` × the cap
requests (or `MAX_WAITING_CALLS_PER_SLOT` × the cap calls) already waiting, is refused with a 503 and
`Retry-After`. Times are wall seconds here; the gateway gives model seconds × its time scale.

`enter` returns a `Ticket` for an admitted call, whose `leave()` must run when the call ends: it holds the
scope it was admitted in, so a cap removed and added back while calls run never miscounts the new one.
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
MAX_WAITING_PER_SLOT = 10        # requests that may wait, per unit of the cap
MAX_WAITING_CALLS_PER_SLOT = 20  # calls that may wait (a fan-out's siblings count each), per unit of the cap
RECENT_PER_SLOT = 4              # requests remembered (per unit of the cap) after their idle end


@dataclass(frozen=True)
class Refusal:
    """Why a call was not admitted: the 503's message and its `Retry-After` seconds."""

    message: str
    retry_after_s: int


@dataclass(eq=False)
class _Active:
    calls: int            # calls of the request in flight
    last_s: float         # when its last call ended (or it was admitted)
    ended: bool = False   # its end was reported while a call was still in flight
    went: bool = False    # a call of it went in (a grant whose calls all went away frees its slot at once)


@dataclass(eq=False)
class Scope:
    """One capped scope (a deployment): its requests in flight, those waiting, and counters."""

    cap: int
    active: dict[str, _Active] = field(default_factory=dict)
    # request id -> the futures of its calls waiting, in the order the requests came
    waiting: OrderedDict[str, list[asyncio.Future[None]]] = field(default_factory=OrderedDict)
    waiting_calls: int = 0
    recent: OrderedDict[str, None] = field(default_factory=OrderedDict)   # ended idle; their next call goes in
    timer: asyncio.TimerHandle | None = None   # wakes the scope when its first idle request ends
    admitted: int = 0        # requests admitted (at once or after waiting)
    waited: int = 0          # requests that had to wait (admitted or not)
    wait_timeouts: int = 0   # calls refused after waiting wait_s
    queue_full: int = 0      # calls refused at once: too many waiting
    idle_ended: int = 0      # requests taken as ended by idleness (no request-span end seen)
    readmitted: int = 0      # requests let in at once after their idle end

    def stats(self) -> dict[str, int]:
        """The scope's figures now (`GET /scepsy/v1/stats`)."""
        return {"max_requests": self.cap, "in_flight": len(self.active), "waiting": len(self.waiting),
                "admitted": self.admitted, "waited": self.waited, "wait_timeouts": self.wait_timeouts,
                "queue_full": self.queue_full, "idle_ended": self.idle_ended, "readmitted": self.readmitted}


class Ticket:
    """An admitted call: `leave()` when it ends (once; later calls do nothing)."""

    __slots__ = ("_gate", "_scope", "_request")

    def __init__(self, gate: Admission | None, scope: Scope | None, request_id: str | None) -> None:
        self._gate, self._scope, self._request = gate, scope, request_id

    def leave(self, *, abandoned: bool = False) -> None:
        """The call ended (`abandoned`: its client left before it was sent, so with no other call of its request
        in flight the request is over and its slot goes now)."""
        gate, sc, rid = self._gate, self._scope, self._request
        self._gate = self._scope = None
        if gate is not None and sc is not None and rid is not None:
            gate._leave(sc, rid, abandoned=abandoned)


UNCAPPED = Ticket(None, None, None)


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
                if sc.timer is not None:
                    sc.timer.cancel()
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
                    waiting: Callable[[bool], None] | None = None) -> Ticket | Refusal:
        """Admit one call (a Ticket, to `leave()` when the call ends), or say why not. `waiting(True)` is called
        when the call starts to wait, `waiting(False)` when it stops (whatever ends it)."""
        sc = self.scopes.get(scope)
        if sc is None:
            return UNCAPPED
        if request_id is None:
            self.uncapped_calls += 1
            return UNCAPPED
        now = self.clock()
        a = sc.active.get(request_id)
        if a is not None:
            a.calls += 1
            a.went = True
            return Ticket(self, sc, request_id)
        if request_id in sc.recent:   # ended by idleness and back: it is no new request
            del sc.recent[request_id]
            sc.active[request_id] = _Active(1, now, went=True)
            sc.readmitted += 1
            return Ticket(self, sc, request_id)
        self._expire(sc, now)
        futs = sc.waiting.get(request_id)
        if futs is None and len(sc.active) < sc.cap and not sc.waiting:
            sc.active[request_id] = _Active(1, now, went=True)
            sc.admitted += 1
            return Ticket(self, sc, request_id)
        if (futs is None and len(sc.waiting) >= MAX_WAITING_PER_SLOT * sc.cap) \
                or sc.waiting_calls >= MAX_WAITING_CALLS_PER_SLOT * sc.cap:
            sc.queue_full += 1
            return Refusal(f"{_name(scope)} is at its request cap ({sc.cap} requests in flight) and "
                           f"{len(sc.waiting)} more requests ({sc.waiting_calls} calls) wait; send fewer at once, or "
                           "raise the cap (`scepsy up --max-requests`)", retry_after_s=max(1, math.ceil(self.idle_s)))
        if futs is None:
            futs = sc.waiting[request_id] = []
            sc.waited += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        futs.append(fut)
        sc.waiting_calls += 1
        self._arm(sc)
        if waiting is not None:
            waiting(True)
        try:
            return await self._wait(sc, scope, request_id, fut, now + self.wait_s)
        finally:
            sc.waiting_calls -= 1
            if waiting is not None:
                waiting(False)

    async def _wait(self, sc: Scope, scope: str | None, request_id: str, fut: asyncio.Future[None],
                    deadline: float) -> Ticket | Refusal:
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout=max(deadline - self.clock(), 0.0))
        except (asyncio.TimeoutError, TimeoutError):
            if not fut.done():
                self._drop_waiter(sc, request_id, fut)
                sc.wait_timeouts += 1
                return Refusal(f"{_name(scope)} is at its request cap ({sc.cap} requests in flight); this "
                               f"request waited {self.wait_s:.0f} s for one to end. The deployment is past its "
                               "capacity: send fewer requests, or give it more GPUs",
                               retry_after_s=max(1, math.ceil(self.idle_s)))
        except asyncio.CancelledError:   # the client went away while waiting, or the gateway stops
            self._drop_waiter(sc, request_id, fut)
            if fut.done() and not fut.cancelled() and self.scopes.get(scope) is sc:
                self._leave(sc, request_id)   # admitted just as it went: its call never runs
            raise
        if self.scopes.get(scope) is not sc:   # the cap was removed while it waited
            return UNCAPPED
        task = asyncio.current_task()
        if task is not None and task.cancelling():   # cancelled as it was let in (wait_for kept the grant)
            self._leave(sc, request_id)
            raise asyncio.CancelledError
        a = sc.active.get(request_id)
        if a is None:   # its request ended while this call was being let in: it counts again
            a = sc.active[request_id] = _Active(1, self.clock())
        a.went = True
        return Ticket(self, sc, request_id)

    def _leave(self, sc: Scope, request_id: str, *, abandoned: bool = False) -> None:
        a = sc.active.get(request_id)
        if a is None:
            return
        a.calls = max(0, a.calls - 1)
        a.last_s = self.clock()
        # reported ended, granted and every call of it went away, or its client left
        if a.calls == 0 and (a.ended or not a.went or abandoned):
            del sc.active[request_id]
            self._grant(sc)
        elif a.calls == 0:
            self._arm(sc)

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

    def _arm(self, sc: Scope) -> None:
        """While requests wait, wake the scope when its first idle request's `idle_s` runs out (one timer)."""
        if sc.timer is not None or not sc.waiting:
            return
        idle = [a.last_s for a in sc.active.values() if a.calls == 0]
        if not idle:
            return   # a call's end arms it again
        delay = max(min(idle) + self.idle_s - self.clock(), 0.0)
        sc.timer = asyncio.get_running_loop().call_later(delay, self._on_timer, sc)

    def _on_timer(self, sc: Scope) -> None:
        sc.timer = None
        self._expire(sc, self.clock())
        self._arm(sc)

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
