"""Bounds on what one request of a workflow may cost, checked by `validate` before anything samples it.

A fan-out of 10^9 copies, a loop of 10^8 repeats or a recursion that doubles down to `max_depth: 64`
are valid YAML, and each would make the sampler (and so `simulate`, `plan`, `bench`) run until memory
is gone. The checks here use each distribution's mean and, where its support is bounded, its largest
value, and follow `use:` recursion down to `max_depth` (memoised per sub-program and depth, so the
check itself costs O(steps × max_depth)). Limits are in `spec.limits`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from scepsy_hpc.spec import limits
from scepsy_hpc.spec.catalog import ModelSpec
from scepsy_hpc.spec.dist import AnyDist, Choice, Constant, Uniform, UniformInt
from scepsy_hpc.spec.source import SourceMap, format_loc

# Names that reach an engine's argv (`--served-model-name`), a job script or a URL: the rule `up` applies
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
# Steps nested through `use:` (the sampler recurses once per level; Python's stack holds ~1000 frames)
MAX_STEP_NESTING = 400


def upper(d: AnyDist) -> float:
    """The largest value `d` can take (inf where its support is unbounded)."""
    if isinstance(d, Constant):
        return d.constant
    if isinstance(d, Uniform):
        return d.uniform.high
    if isinstance(d, UniformInt):
        return float(d.uniform_int.high)
    if isinstance(d, Choice):
        return max(d.choice.values)
    return math.inf


def lower(d: AnyDist) -> float | None:
    """The smallest value `d` can take where its support is bounded below by a given value, else None."""
    if isinstance(d, Constant):
        return d.constant
    if isinstance(d, Uniform):
        return d.uniform.low
    if isinstance(d, UniformInt):
        return float(d.uniform_int.low)
    if isinstance(d, Choice):
        return min(d.choice.values)
    return None


def _size(d: AnyDist) -> float:
    """What a bound is checked on: the largest value where finite, else the mean."""
    top = upper(d)
    return top if math.isfinite(top) else d.mean()


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x < 1e15 else f"{x:.3g}"


def check_quantities(wf: Any, smap: SourceMap, models: dict[str, ModelSpec] | None,
                     steps: Callable[[], Any]) -> list[str]:
    """Fan-out counts, loop repeats, token counts (against the model's context) and tool latencies."""
    from scepsy_hpc.spec.workflow import CallStep, FanoutStep, LoopStep

    problems: list[str] = []

    def bound(d: AnyDist, loc: tuple[Any, ...], limit: limits.Limit, what: str) -> None:
        n = _size(d)
        if limit.exceeded(n):
            kind = "can reach" if math.isfinite(upper(d)) else "averages"
            problems.append(f"{smap.where(loc)}: {format_loc(loc)}: {what} {kind} {_fmt(n)}; {limit.hint()}")

    for key in wf.llms:
        if not NAME.fullmatch(str(key)):
            problems.append(f"{smap.where(('llms', key), key=True)}: llms: LLM name {str(key)!r} is not usable as an "
                            f"engine's served model name; use {NAME_RULE}")
    for name, tool in wf.tools.items():
        bound(tool.latency_s, ("tools", name, "latency_s"), limits.SECONDS, "the latency")
    for step, loc in steps():
        if isinstance(step, FanoutStep):
            bound(step.fanout.count, loc + ("fanout", "count"), limits.FANOUT, "the fan-out count")
        elif isinstance(step, LoopStep):
            bound(step.loop.repeat, loc + ("loop", "repeat"), limits.LOOP_REPEAT, "the loop's repeat")
        elif isinstance(step, CallStep):
            problems += _check_tokens(wf, step, loc, smap, models)
    return problems


def _context(wf: Any, llm: str, models: dict[str, ModelSpec] | None) -> tuple[int, str] | None:
    ref = wf.llms.get(llm)
    if ref is None:
        return None
    if isinstance(ref.model, ModelSpec):
        return ref.model.max_model_len, ref.model.hf_id
    if models is not None and ref.model in models:
        return models[ref.model].max_model_len, ref.model
    return None


def _check_tokens(wf: Any, step: Any, loc: tuple[Any, ...], smap: SourceMap,
                  models: dict[str, ModelSpec] | None) -> list[str]:
    problems: list[str] = []
    out_loc, in_loc = loc + ("output_tokens",), loc + ("prompt_tokens",)
    low = lower(step.output_tokens)
    least = low if low is not None else step.output_tokens.mean()
    if least < 1:
        problems.append(f"{smap.where(out_loc)}: {format_loc(out_loc)}: an LLM call produces at least 1 token; "
                        f"got {'a smallest value' if low is not None else 'a mean'} of {least:g}")
    sizes = {"prompt_tokens": (_size(step.prompt_tokens), in_loc), "output_tokens": (_size(step.output_tokens), out_loc),
             "shared_prefix_tokens": (float(step.shared_prefix_tokens), loc + ("shared_prefix_tokens",))}
    for what, (n, where) in sizes.items():
        if limits.TOKENS.exceeded(n):
            problems.append(f"{smap.where(where)}: {format_loc(where)}: {_fmt(n)} tokens; {limits.TOKENS.hint()}")
    if step.shared_prefix_tokens and step.context is None and lower(step.prompt_tokens) is not None \
            and step.shared_prefix_tokens >= lower(step.prompt_tokens):
        where = loc + ("shared_prefix_tokens",)
        problems.append(f"{smap.where(where)}: {format_loc(where)}: {step.shared_prefix_tokens} shared tokens, but the "
                        f"prompt may be as short as {_fmt(lower(step.prompt_tokens))}; the shared prefix is part of the "
                        f"prompt: make it smaller than the shortest prompt")
    ctx = _context(wf, step.call, models)
    if ctx is None or problems:
        return problems
    max_len, model = ctx
    n_in, n_out = sizes["prompt_tokens"][0], sizes["output_tokens"][0]
    if n_out > max_len:
        problems.append(f"{smap.where(out_loc)}: {format_loc(out_loc)}: {_fmt(n_out)} output tokens exceed the context of "
                        f"{model} ({max_len:,} tokens, max_model_len in the model catalog)")
    elif n_in + n_out > max_len:
        problems.append(f"{smap.where(in_loc)}: {format_loc(loc)}: prompt ({_fmt(n_in)}) + output ({_fmt(n_out)}) tokens "
                        f"exceed the context of {model} ({max_len:,} tokens, max_model_len in the model catalog); "
                        f"shorten the prompt or the output")
    return problems


class _Cost:
    """Expected and largest number of calls and tool uses of a step list, through `use` down to max_depth."""

    def __init__(self, wf: Any, max_depth: int) -> None:
        self.wf, self.max_depth = wf, max_depth
        self.memo: dict[tuple[str, int], tuple[float, float, int]] = {}

    def body(self, steps: list[Any], depth: int) -> tuple[float, float, int]:
        """(expected, largest, nesting) of a step list at `use` depth `depth`."""
        mean = worst = 0.0
        nest = 0
        for step in steps:
            m, w, n = self.step(step, depth)
            mean, worst, nest = mean + m, worst + w, max(nest, n)
        return mean, worst, nest

    def step(self, step: Any, depth: int) -> tuple[float, float, int]:
        from scepsy_hpc.spec.workflow import BranchStep, CallStep, FanoutStep, LoopStep, ParallelStep, ToolStep, UseStep

        if isinstance(step, (CallStep, ToolStep)):
            return 1.0, 1.0, 1
        if isinstance(step, (FanoutStep, LoopStep)):
            rep = step.fanout if isinstance(step, FanoutStep) else step.loop
            times = rep.count if isinstance(step, FanoutStep) else rep.repeat
            m, w, n = self.body(rep.body, depth)
            return times.mean() * m, _mul(upper(times), w), n + 1
        if isinstance(step, ParallelStep):
            parts = [self.body(lane, depth) for lane in step.parallel]
            return sum(p[0] for p in parts), sum(p[1] for p in parts), 1 + max(p[2] for p in parts)
        if isinstance(step, BranchStep):
            parts = [self.body(arm.body, depth) for arm in step.branch]
            return (sum(arm.p * p[0] for arm, p in zip(step.branch, parts)), max(p[1] for p in parts),
                    1 + max(p[2] for p in parts))
        if isinstance(step, UseStep):
            if depth >= self.max_depth or step.use not in self.wf.define:
                return 0.0, 0.0, 1
            key = (step.use, depth + 1)
            if key not in self.memo:
                self.memo[key] = (0.0, 0.0, 0)  # unreachable: a cycle is cut by the depth
                self.memo[key] = self.body(self.wf.define[step.use], depth + 1)
            m, w, n = self.memo[key]
            return m, w, n + 1
        return 0.0, 0.0, 1


def _mul(a: float, b: float) -> float:
    return 0.0 if b == 0 else a * b  # inf × 0 is 0 here: no calls however many times


def check_cost(wf: Any, smap: SourceMap) -> list[str]:
    """The expected (and, where every count is bounded, the largest) number of calls and tool uses of one
    request, through `use` recursion down to max_depth, against `SCEPSY_MAX_CALLS_PER_REQUEST`."""
    max_depth = wf.max_depth if wf.max_depth is not None else 64   # the sampler's default
    mean, worst, nest = _Cost(wf, max_depth).body(wf.program, 0)
    where = smap.where(("max_depth",)) if wf.max_depth is not None and wf.define else smap.where(("program",), key=True)
    via = f" (through use: recursion down to max_depth {max_depth})" if wf.define else ""
    problems: list[str] = []
    if limits.CALLS_PER_REQUEST.exceeded(mean):
        problems.append(f"{where}: one request makes {_fmt(mean)} LLM calls and tool uses on average{via}; "
                        f"lower max_depth, fan-out counts or loop repeats; {limits.CALLS_PER_REQUEST.hint()}")
    elif math.isfinite(worst) and limits.CALLS_PER_REQUEST.exceeded(worst):
        problems.append(f"{where}: one request can make up to {_fmt(worst)} LLM calls and tool uses{via}; "
                        f"lower max_depth, fan-out counts or loop repeats; {limits.CALLS_PER_REQUEST.hint()}")
    if nest > MAX_STEP_NESTING:
        problems.append(f"{where}: steps nest {nest} levels deep{via}; at most {MAX_STEP_NESTING}: "
                        f"lower max_depth or flatten the program")
    return problems
