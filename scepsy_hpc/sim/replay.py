"""Replaying single LLM calls on engines in the simulator: what a profiling run measures."""

from __future__ import annotations

import math
from collections import deque
from typing import Sequence

from scepsy_hpc.perf.model import EngineConfig, EnginePerf
from scepsy_hpc.sim.core import MIN_KV_TOKENS, PRIO_ARRIVAL, PRIO_ENGINE, CallRecord, EventLoop, _Lane, _Root, _Sim
from scepsy_hpc.sim.engine import Seq, SimEngine
from scepsy_hpc.workload.sampler import Call


def replay_calls(
    cfg: EngineConfig,
    calls: Sequence[Call],
    arrivals: Sequence[float],
    *,
    replicas: int = 1,
    horizon_s: float = math.inf,
) -> list[CallRecord]:
    """Replay single LLM calls (arriving at `arrivals`, model seconds) on `replicas` engines of
    configuration `cfg` behind one gateway queue; returns the finished calls' records. This is
    what a profiling run measures on a real engine, done in the simulator."""
    if len(calls) != len(arrivals):
        raise ValueError("one arrival time per call")
    loop = EventLoop()
    perf = EnginePerf(cfg)
    perf.check_fits(MIN_KV_TOKENS, label=f"model {cfg.model.hf_id}")
    llm = calls[0].llm if calls else "llm"
    engines = {llm: [SimEngine(loop, perf, f"{llm}/{r}", PRIO_ENGINE) for r in range(replicas)]}
    backlog: deque[Seq] = deque()
    for engine in engines[llm]:
        engine.backlog = backlog
    sim = _Sim(engines, record_calls=True)

    def arrive(t: float, i: int) -> None:
        root = _Root(sim, i, t)
        _Lane(sim, [calls[i]], root, root).run(t)
        if i + 1 < len(arrivals):
            loop.at(arrivals[i + 1], PRIO_ARRIVAL, arrive, i + 1)

    if arrivals:
        loop.at(arrivals[0], PRIO_ARRIVAL, arrive, 0)
    loop.run(horizon_s)
    return sim.calls
