"""Sampling one workflow request: a program becomes a tree of calls, tool waits and parallel groups.

A sampled request is a *sequence*: a Python list whose items are
  Call(...)            an LLM call with its sampled prompt and output tokens,
  Tool(...)            a tool wait of a sampled duration (seconds),
  list[list[...]]      a parallel group: each inner list is a sequence, all run concurrently.
Loops and branches disappear at sampling time; `use` is inlined down to `max_depth` nested uses,
and a `use` deeper than that runs nothing (the recursion's base case).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Hashable

from scepsy_hpc.spec import limits
from scepsy_hpc.spec.workflow import (
    BranchStep, CallStep, FanoutStep, LoopStep, ParallelStep, ToolStep, UseStep, Workflow,
)


Segments = tuple[tuple[Hashable, int], ...]
Conversation = tuple[Segments, Hashable]   # its segments (prompts and answers so far), the one this lane extends
_segment_ids = itertools.count(1)   # conversation segments: unique in the process (never equal across requests)


@dataclass(frozen=True, slots=True)
class Call:
    """One sampled LLM call.

    `segments` lays the prompt out as (segment, tokens) pieces whose names stand for their content and
    everything before it (`perf.prefix.segment_blocks` names the prompt's cache blocks from them): a
    shared system prompt is `("shared", llm, role, n)`, the same in every request; conversation pieces
    are numbers unique in the process, one per branch of the conversation (a continuing call extends
    it). `()` means a prompt that shares nothing. `output_segment` names the answer's piece (the
    prompt's last), which a continuing call of the same conversation has in its prompt. Neither field takes
    part in equality: two samples are equal when their shapes and token counts are."""

    llm: str
    role: str | None
    prompt_tokens: int
    output_tokens: int
    segments: Segments = field(default=(), compare=False)
    output_segment: Hashable = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Tool:
    """One sampled tool wait."""

    name: str
    latency_s: float


def _count(x: float, cap: int) -> int:
    # a draw from an unbounded distribution (lognormal, geometric, …) whose mean passed validation
    # may still, rarely, be huge: clipped at the limit validation applies to bounded ones
    return min(max(0, int(round(x))), cap)


def _tokens(x: float) -> int:
    return max(1, int(round(x)))


class RequestSampler:
    """Samples requests of one workflow; sub-program bodies are looked up by name."""

    def __init__(self, wf: Workflow) -> None:
        self.wf = wf
        self.max_depth = wf.max_depth if wf.max_depth is not None else 64
        self.max_fanout, self.max_repeat = limits.FANOUT.value(), limits.LOOP_REPEAT.value()
        # LLMs whose engines run without a prefix cache: their calls carry no segments (nothing is reused)
        self.uncached = {k for k, ref in wf.llms.items() if not getattr(ref, "prefix_caching", True)}

    def sample(self, rng: random.Random) -> list[Any]:
        """One request's execution tree."""
        out: list[Any] = []
        self._steps(self.wf.program, rng, 0, out, {})
        return out

    def _call(self, step: CallStep, rng: random.Random, ctx: dict[str, Conversation]) -> Call:
        new, output = _tokens(step.prompt_tokens.sample(rng)), _tokens(step.output_tokens.sample(rng))
        state = ctx.get(step.context) if step.context is not None else None
        if state is None and not step.shared_prefix_tokens and step.context is None:
            return Call(step.call, step.role, new, output)   # shares nothing: no segments to carry
        if state is None:
            shared = min(step.shared_prefix_tokens, new - 1)
            history: Segments = ((("shared", step.call, step.role, shared), shared),) if shared > 0 else ()
            own: Hashable = None
            new -= shared
        else:
            history, own = state
        # a lane extends its own segment (names stay (segment, end position): the earlier calls' blocks
        # keep their names), so a call carries one piece per branch of its conversation, not one per step
        if own is not None and history and history[-1][0] == own:
            segments = history[:-1] + ((own, history[-1][1] + new),)
        else:
            own = next(_segment_ids)
            segments = history + ((own, new),)
        if step.context is not None:
            ctx[step.context] = (segments[:-1] + ((own, segments[-1][1] + output),), own)
        if step.call in self.uncached:   # the whole conversation, computed every time
            return Call(step.call, step.role, sum(n for _, n in segments), output)
        return Call(step.call, step.role, sum(n for _, n in segments), output, segments, own)

    @staticmethod
    def _lane(ctx: dict[str, Conversation]) -> dict[str, Conversation]:
        """A lane's view of the conversations: the same history, none of its segments its own to extend."""
        return {k: (segs, None) for k, (segs, _) in ctx.items()}

    def _steps(self, steps: list[Any], rng: random.Random, depth: int, out: list[Any],
               ctx: dict[str, Conversation]) -> None:
        for step in steps:
            if isinstance(step, CallStep):
                out.append(self._call(step, rng, ctx))
            elif isinstance(step, ToolStep):
                out.append(Tool(step.tool, self.wf.tools[step.tool].latency_s.sample(rng)))
            elif isinstance(step, LoopStep):
                for _ in range(_count(step.loop.repeat.sample(rng), self.max_repeat)):
                    self._steps(step.loop.body, rng, depth, out, ctx)
            elif isinstance(step, BranchStep):
                u, acc = rng.random(), 0.0
                arm = step.branch[-1]
                for candidate in step.branch:
                    acc += candidate.p
                    if u < acc:
                        arm = candidate
                        break
                self._steps(arm.body, rng, depth, out, ctx)
            elif isinstance(step, FanoutStep):
                lanes = []
                for _ in range(_count(step.fanout.count.sample(rng), self.max_fanout)):
                    lane: list[Any] = []
                    self._steps(step.fanout.body, rng, depth, lane, self._lane(ctx))
                    if lane:
                        lanes.append(lane)
                _append_group(out, lanes)
            elif isinstance(step, ParallelStep):
                lanes = []
                for body in step.parallel:
                    lane = []
                    self._steps(body, rng, depth, lane, self._lane(ctx))
                    if lane:
                        lanes.append(lane)
                _append_group(out, lanes)
            elif isinstance(step, UseStep):
                if depth < self.max_depth:
                    self._steps(self.wf.define[step.use], rng, depth + 1, out, ctx)
            else:  # pragma: no cover - the spec admits no other step
                raise TypeError(f"unknown step {step!r}")


def _append_group(out: list[Any], lanes: list[list[Any]]) -> None:
    if len(lanes) == 1:
        out.extend(lanes[0])  # a group of one lane is just a sequence
    elif lanes:
        out.append(lanes)


def sample_request(wf: Workflow, rng: random.Random) -> list[Any]:
    """One request of `wf` sampled with `rng`."""
    return RequestSampler(wf).sample(rng)


def iter_calls(seq: list[Any]) -> Any:
    """Every Call in a sampled request, depth first."""
    for item in seq:
        if isinstance(item, Call):
            yield item
        elif isinstance(item, list):
            for lane in item:
                yield from iter_calls(lane)


def unloaded_latency(seq: list[Any], call_latency: Any) -> float:
    """Critical-path latency of a sampled request when each call takes `call_latency(call)` seconds."""
    total = 0.0
    for item in seq:
        if isinstance(item, Call):
            total += call_latency(item)
        elif isinstance(item, Tool):
            total += item.latency_s
        else:
            total += max(unloaded_latency(lane, call_latency) for lane in item)
    return total
