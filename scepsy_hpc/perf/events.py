"""The discrete-event clock the iteration-level engines run on.

A heap of (time, priority, sequence number). At equal timestamps events run in this order, and
within a class in the order they were scheduled:
    PRIO_ARRIVAL (0)  a new request (or call) arrives
    PRIO_TOOL    (1)  a tool wait ends
    PRIO_ENGINE  (2)  an engine iteration (or run of decode iterations) ends
so new work that appears at the instant an iteration ends is seen by that boundary's scheduling
step, as a real scheduler sees every request that reached it before it runs.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Callable

PRIO_ARRIVAL, PRIO_TOOL, PRIO_ENGINE = 0, 1, 2


class EventLoop:
    """A heap of timed callbacks `fn(t, arg)`, ordered by (time, priority, insertion order)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Callable[[float, Any], None], Any]] = []
        self._n = 0
        self.now = 0.0
        self.events = 0

    def at(self, t: float, priority: int, fn: Callable[[float, Any], None], arg: Any = None) -> None:
        """Run `fn(t, arg)` at time `t`."""
        self._n += 1
        heapq.heappush(self._heap, (t, priority, self._n, fn, arg))

    def run(self, horizon: float = math.inf) -> None:
        """Process events in order until none is left or the next is after `horizon`."""
        heap, pop = self._heap, heapq.heappop
        n = 0
        while heap:
            if heap[0][0] > horizon:
                break
            t, _, _, fn, arg = pop(heap)
            self.now = t
            fn(t, arg)
            n += 1
        self.events += n

    def run_before(self, t_stop: float) -> None:
        """Process events in order while the next is strictly before `t_stop` (events at `t_stop` wait)."""
        heap, pop = self._heap, heapq.heappop
        n = 0
        while heap and heap[0][0] < t_stop:
            t, _, _, fn, arg = pop(heap)
            self.now = t
            fn(t, arg)
            n += 1
        self.events += n
