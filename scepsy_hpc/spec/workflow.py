"""Workflow spec (DESIGN.md §3.1): the LLMs and tools a workflow calls and how one request runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Iterator, Union

from pydantic import Discriminator, Field, PositiveFloat, Tag, model_validator

from scepsy_hpc.spec.base import SpecModel
from scepsy_hpc.spec.catalog import ModelSpec
from scepsy_hpc.spec.dist import Dist
from scepsy_hpc.spec.source import SourceMap, format_loc, load_yaml, parse_document, parse_yaml, suggest

STEP_KINDS = ("call", "tool", "parallel", "fanout", "loop", "branch", "use")


class CallStep(SpecModel):
    """One LLM call; `role` separates token profiles when one LLM serves several roles.

    Prefix reuse (an engine's prefix cache computes a shared leading part of a prompt once):
    - `context: NAME` — the call continues conversation NAME of its request (a ReAct step re-sends the
      conversation so far): its prompt is every earlier call's prompt and answer in NAME, then
      `prompt_tokens` new tokens (the tool result, the next instruction). The first call of NAME
      starts it. Lanes of a `parallel`/`fanout` branch off the conversation (beam search: a shared
      prefix, diverging continuations); after the group it goes on from where it was before.
    - `shared_prefix_tokens: N` — the first N tokens of the prompt are the same for every request
      (a system prompt, tool definitions), counted within `prompt_tokens`; for a `context` call it
      applies to the call that starts the conversation.
    """

    call: str
    role: str | None = None
    prompt_tokens: Dist
    output_tokens: Dist
    context: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    shared_prefix_tokens: Annotated[int, Field(ge=0)] = 0


class ToolStep(SpecModel):
    """A tool invocation: latency only, no GPU."""

    tool: str


class ParallelStep(SpecModel):
    """Step lists that run concurrently (different LLMs at once); done when all are done."""

    parallel: Annotated[list[list["Step"]], Field(min_length=1)]


class _Repeat(SpecModel):
    count: Dist
    body: list["Step"]


class FanoutStep(SpecModel):
    """`count` concurrent copies of `body`."""

    fanout: _Repeat


class _Loop(SpecModel):
    repeat: Dist
    body: list["Step"]


class LoopStep(SpecModel):
    """`body` repeated `repeat` times, one after another."""

    loop: _Loop


class BranchArm(SpecModel):
    """One arm of a probabilistic branch."""

    p: Annotated[float, Field(ge=0.0, le=1.0)]
    body: list["Step"]


class BranchStep(SpecModel):
    """Exactly one arm runs, chosen with probability `p`."""

    branch: Annotated[list[BranchArm], Field(min_length=1)]

    @model_validator(mode="after")
    def _sums_to_one(self) -> "BranchStep":
        total = sum(arm.p for arm in self.branch)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            ps = " + ".join(f"{arm.p:g}" for arm in self.branch)
            raise ValueError(f"branch probabilities must sum to 1, got {ps} = {total:g}; adjust the p values")
        return self


class UseStep(SpecModel):
    """Run the named sub-program from `define:`."""

    use: str


def _step_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = [k for k in STEP_KINDS if k in value]
        return kinds[0] if len(kinds) == 1 else None
    for kind, cls in _STEP_CLASSES.items():
        if isinstance(value, cls):
            return kind
    return None


Step = Annotated[
    Union[
        Annotated[CallStep, Tag("call")],
        Annotated[ToolStep, Tag("tool")],
        Annotated[ParallelStep, Tag("parallel")],
        Annotated[FanoutStep, Tag("fanout")],
        Annotated[LoopStep, Tag("loop")],
        Annotated[BranchStep, Tag("branch")],
        Annotated[UseStep, Tag("use")],
    ],
    Discriminator(
        _step_tag,
        custom_error_type="step",
        custom_error_message="a step is a mapping with exactly one of the keys: " + ", ".join(STEP_KINDS),
    ),
]
_STEP_CLASSES = {
    "call": CallStep, "tool": ToolStep, "parallel": ParallelStep, "fanout": FanoutStep,
    "loop": LoopStep, "branch": BranchStep, "use": UseStep,
}


class LLMRef(SpecModel):
    """An LLM deployment of the workflow: a catalog model key or an inline model spec, and how its engines run.

    - `tool_call_rate`: the simulated engine's chance of answering a call that offers tools with tool calls
      (then halved each tool round); real engines ignore it. Unset: the sim engine's default.
    - `prefix_caching`: engines cache prompt prefixes, as vLLM does by default; false passes
      --no-enable-prefix-caching to vLLM and the sim engine, --disable-radix-cache to SGLang.
    """

    model: Union[str, ModelSpec]
    tool_call_rate: Annotated[float, Field(ge=0, le=1)] | None = None
    prefix_caching: bool = True


class ToolSpec(SpecModel):
    """A tool: its latency distribution in seconds."""

    latency_s: Dist
    description: str = ""


class Target(SpecModel):
    """Default objective for `plan`/`up`: a throughput to sustain and/or a latency SLO."""

    throughput_rps: PositiveFloat | None = None
    latency_slo_s: PositiveFloat | None = None

    @model_validator(mode="after")
    def _one_given(self) -> "Target":
        if self.throughput_rps is None and self.latency_slo_s is None:
            raise ValueError("target needs throughput_rps or latency_slo_s")
        return self


class Driver(SpecModel):
    """A real workflow program to trace instead of `program`."""

    entrypoint: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]
    inputs: str | None = None


class Workflow(SpecModel):
    """A workflow spec, validated; `source` is the file it came from (for messages)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    llms: Annotated[dict[str, LLMRef], Field(min_length=1)]
    tools: dict[str, ToolSpec] = {}
    target: Target | None = None
    define: dict[str, list[Step]] = {}
    max_depth: Annotated[int, Field(ge=1, le=64)] | None = None
    program: Annotated[list[Step], Field(min_length=1)]
    driver: Driver | None = None


def iter_steps(steps: list[Any], loc: tuple[Any, ...]) -> Iterator[tuple[Any, tuple[Any, ...]]]:
    """Every step below `steps`, depth first, with its data path."""
    for i, step in enumerate(steps):
        here = loc + (i,)
        yield step, here
        if isinstance(step, ParallelStep):
            for j, lane in enumerate(step.parallel):
                yield from iter_steps(lane, here + ("parallel", j))
        elif isinstance(step, FanoutStep):
            yield from iter_steps(step.fanout.body, here + ("fanout", "body"))
        elif isinstance(step, LoopStep):
            yield from iter_steps(step.loop.body, here + ("loop", "body"))
        elif isinstance(step, BranchStep):
            for j, arm in enumerate(step.branch):
                yield from iter_steps(arm.body, here + ("branch", j, "body"))


def continues_conversations(wf: Workflow) -> bool:
    """Whether any call of `wf` continues a conversation (`context:`), in its program or a `define`."""
    return any(isinstance(step, CallStep) and step.context is not None for step, _ in _all_bodies(wf))


def _all_bodies(wf: Workflow) -> Iterator[tuple[Any, tuple[Any, ...]]]:
    yield from iter_steps(wf.program, ("program",))
    for name, body in wf.define.items():
        yield from iter_steps(body, ("define", name))


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the `define` → `use` graph, as a list of names, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def check_references(wf: Workflow, smap: SourceMap, models: dict[str, ModelSpec] | None) -> list[str]:
    """Cross-reference problems: unknown LLM, tool, sub-program or model names; unbounded recursion."""
    problems: list[str] = []
    uses: dict[str, set[str]] = {name: set() for name in wf.define}
    for step, loc in _all_bodies(wf):
        if isinstance(step, CallStep) and step.call not in wf.llms:
            problems.append(f"{smap.where(loc + ('call',))}: {format_loc(loc)}.call: unknown LLM {step.call!r}; "
                            f"{suggest(step.call, wf.llms)} (declare it under llms:)")
        elif isinstance(step, ToolStep) and step.tool not in wf.tools:
            problems.append(f"{smap.where(loc + ('tool',))}: {format_loc(loc)}.tool: unknown tool {step.tool!r}; "
                            f"{suggest(step.tool, wf.tools) if wf.tools else 'no tools are declared'} (declare it under tools:)")
        elif isinstance(step, UseStep):
            if step.use not in wf.define:
                problems.append(f"{smap.where(loc + ('use',))}: {format_loc(loc)}.use: unknown sub-program {step.use!r}; "
                                f"{suggest(step.use, wf.define) if wf.define else 'nothing is defined'} (add it under define:)")
            elif loc[0] == "define":
                uses[loc[1]].add(step.use)
    cycle = _find_cycle(uses)
    if cycle and wf.max_depth is None:
        problems.append(f"{smap.where(('define', cycle[0]), key=True)}: define.{cycle[0]}: recursion without a bound "
                        f"({' -> '.join(cycle)}); add a top-level 'max_depth: N' to bound it")
    if models is not None:
        for key, ref in wf.llms.items():
            if isinstance(ref.model, str) and ref.model not in models:
                problems.append(f"{smap.where(('llms', key, 'model'))}: llms.{key}.model: unknown model {ref.model!r}; "
                                f"{suggest(ref.model, models)} (add it to configs/models.yaml or give an inline spec)")
    return problems


def parse_workflow(data: Any, smap: SourceMap, models: dict[str, ModelSpec] | None = None) -> Workflow:
    """Validate parsed YAML as a workflow; every problem is reported at once, each with file:line."""
    return parse_document(Workflow, data, smap, "a workflow spec is a mapping with keys name, llms, program, …",
                          lambda wf: check_workflow(wf, smap, models))


def check_workflow(wf: Workflow, smap: SourceMap, models: dict[str, ModelSpec] | None) -> list[str]:
    """Cross-references first; with those right, names, quantities and the cost of one request
    (`spec.workflow_bounds`: what would make sampling run away)."""
    from scepsy_hpc.spec.workflow_bounds import check_cost, check_quantities

    problems = check_references(wf, smap, models)
    if problems:
        return problems
    problems = check_quantities(wf, smap, models, lambda: _all_bodies(wf))
    return problems or check_cost(wf, smap)


def load_workflow(path: str | Path, models: dict[str, ModelSpec] | None = None) -> Workflow:
    """Load and validate a workflow spec file."""
    data, smap = load_yaml(path)
    return parse_workflow(data, smap, models)


def workflow_from_text(text: str, models: dict[str, ModelSpec] | None = None, path: str = "<string>") -> Workflow:
    """Load a workflow from YAML text (tests, stdin)."""
    data, smap = parse_yaml(text, path)
    return parse_workflow(data, smap, models)


def without_prefix_caching(wf: Workflow) -> Workflow:
    """The workflow as served by engines without a prefix cache (`--no-prefix-caching`): the same prompts,
    every token of them computed every time."""
    return wf.model_copy(update={"llms": {k: ref.model_copy(update={"prefix_caching": False})
                                          for k, ref in wf.llms.items()}})


def resolve_model(wf: Workflow, llm: str, models: dict[str, ModelSpec]) -> ModelSpec:
    """The ModelSpec behind one of the workflow's LLM deployments."""
    ref = wf.llms[llm].model
    return ref if isinstance(ref, ModelSpec) else models[ref]


for _cls in (ParallelStep, _Repeat, _Loop, BranchArm, Workflow):
    _cls.model_rebuild()
