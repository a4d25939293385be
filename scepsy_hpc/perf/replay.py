"""Replaying single LLM calls on simulated engines: what a profiling run measures, without an engine."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Hashable, Protocol, Sequence

from scepsy_hpc.perf.engine import CallRecord, EnginePool, Seq, SimEngine
from scepsy_hpc.perf.events import PRIO_ARRIVAL, PRIO_ENGINE, EventLoop
from scepsy_hpc.perf.fit import check_fit
from scepsy_hpc.perf.model import EngineConfig
from scepsy_hpc.perf.prefix_runs import Runs, segment_runs


class LLMCall(Protocol):
    """One call's LLM and sizes (a sampled `workload.sampler.Call` is one)."""

    @property
    def llm(self) -> str: ...
    @property
    def role(self) -> str | None: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...


_fresh_ids = itertools.count(1)


def fresh_segments(calls: Sequence[Any]) -> list[Any]:
    """Copies of one request's calls (sampled `workload.sampler.Call`s) with their per-request segments
    renamed afresh, one mapping for the whole request so its conversation still continues: replaying
    a recorded pattern for several requests must not let them hit each other's conversations. Shared
    segments (tuple names, `("shared", llm, role, n)`) keep their names: every request shares them."""
    names: dict[Hashable, Hashable] = {}

    def rename(seg: Hashable) -> Hashable:
        if seg is None or isinstance(seg, tuple):
            return seg
        new = names.get(seg)
        if new is None:
            new = names[seg] = ("replay", next(_fresh_ids))
        return new

    out = []
    for c in calls:
        segs = getattr(c, "segments", ())
        if not segs:
            out.append(c)
            continue
        out.append(dataclasses.replace(c, segments=tuple((rename(s), n) for s, n in segs),
                                       output_segment=rename(c.output_segment)))
    return out


WARM = "warm"   # a call whose first segment is named (WARM, ...) finds that segment cached on arrival (replay_calls)


def call_blocks(call: Any) -> Runs | None:
    """The call's prompt+answer cache block names, or None when it carries no segments."""
    segs = getattr(call, "segments", ())
    if not segs:
        return None
    return segment_runs(tuple(segs) + ((call.output_segment, call.output_tokens),))


def replay_calls(
    cfg: EngineConfig,
    calls: Sequence[LLMCall],
    arrivals: Sequence[float],
    *,
    replicas: int = 1,
    horizon_s: float = math.inf,
    prefix_affinity: bool = True,
) -> list[CallRecord]:
    """Replay single LLM calls, arriving at `arrivals` (model seconds), on `replicas` engines of
    configuration `cfg` behind one gateway queue; returns the finished calls' records, call i as
    request i. This is what a profiling run measures on a real engine, done in the simulator.
    Calls with `segments` use the engines' prefix cache (rename a replayed pattern's segments per
    request with `fresh_segments`); a call whose first segment is named `(WARM, ...)` finds that
    segment cached (a conversation's history, computed by the call before: `profile.synthetic`), held
    in the KV cache as its own (`EnginePool.submit`'s `warm_tokens`: the warm case, without cache
    bookkeeping, so profiles cost what they cost without reuse)."""
    if len(calls) != len(arrivals):
        raise ValueError("one arrival time per call")
    loop = EventLoop()
    perf = check_fit(cfg, label=f"model {cfg.model.hf_id}")
    llm = calls[0].llm if calls else "llm"
    pool = EnginePool([SimEngine(loop, perf, f"{llm}/{r}", PRIO_ENGINE) for r in range(replicas)],
                      prefix_affinity=prefix_affinity)
    out: list[CallRecord] = []

    def arrive(t: float, i: int) -> None:
        def done(t_end: float, s: Seq) -> None:
            out.append(CallRecord(i, s.llm, s.role, s.replica, s.prompt, s.output, s.t_submit, s.t_admit, s.t_first, t_end,
                                  s.cached))

        c = calls[i]
        segs = getattr(c, "segments", ())
        if segs and isinstance(segs[0][0], tuple) and segs[0][0][:1] == (WARM,):
            # its history was computed by the request's previous call, which has just ended: found cached
            pool.submit(c.llm, c.role, c.prompt_tokens, c.output_tokens, t, done, warm_tokens=segs[0][1])
        else:
            pool.submit(c.llm, c.role, c.prompt_tokens, c.output_tokens, t, done, call_blocks(c))
        if i + 1 < len(arrivals):
            loop.at(arrivals[i + 1], PRIO_ARRIVAL, arrive, i + 1)

    if arrivals:
        loop.at(arrivals[0], PRIO_ARRIVAL, arrive, 0)
    loop.run(horizon_s)
    return out
