"""The event loop's documented tie-break order at equal timestamps."""

from __future__ import annotations

from scepsy_hpc.perf.events import PRIO_ARRIVAL, PRIO_ENGINE, PRIO_TOOL, EventLoop


def test_event_loop_tie_break_order():
    loop, seen = EventLoop(), []
    for prio, tag in [(PRIO_ENGINE, "engine-1"), (PRIO_TOOL, "tool"), (PRIO_ENGINE, "engine-2"), (PRIO_ARRIVAL, "arrival")]:
        loop.at(1.0, prio, lambda t, x: seen.append(x), tag)
    loop.at(0.5, PRIO_ENGINE, lambda t, x: seen.append(x), "earlier")
    loop.run()
    assert seen == ["earlier", "arrival", "tool", "engine-1", "engine-2"]
