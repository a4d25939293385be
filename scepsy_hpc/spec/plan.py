"""Plan file (DESIGN.md §3.4), allocation part: per LLM `tp`, `gpu_frac`, `replicas` on `gpus`.

Written by `scepsy plan`, read by `simulate`/`up`; a hand-written plan is the user-specified
allocation and goes through the same validation.

An LLM is served by one group of like replicas (a mapping) or by a **mixed group**: a list of
configurations, each with its replica count, e.g.
`gen: [{tp: 4, replicas: 2}, {tp: 1, gpu_frac: 0.5, replicas: 3}]`. Replicas are numbered group by
group in the order written (here gen·0, gen·1 are tp 4; gen·2..4 the halves). Unlike replicas share
the LLM's calls by capacity weight (`capacity_rps`, written by the planner; estimated from the
performance model when left out).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Mapping, Sequence, Union

from pydantic import Discriminator, Field, Tag, model_validator

from scepsy_hpc.errors import InfeasibleError
from scepsy_hpc.spec import limits
from scepsy_hpc.spec.base import SpecModel
from scepsy_hpc.spec.catalog import GPUSpec, ModelSpec
from scepsy_hpc.spec.fractions import gpus_for_fractions
from scepsy_hpc.spec.placement_check import check_placement
from scepsy_hpc.spec.placement_entry import PlacementEntry
from scepsy_hpc.spec.source import SourceMap, load_yaml, parse_document, suggest
from scepsy_hpc.spec.workflow import Target, Workflow, resolve_model

TP_DEGREES = (1, 2, 4, 8, 16)
MAX_NUM_SEQS = 1_000_000   # vLLM's scheduler slots; far above any engine's batch


class LLMAlloc(SpecModel):
    """How one LLM deployment is served: `replicas` instances of `tp` GPUs, or of a `gpu_frac` share."""

    tp: Annotated[int, Field(description="tensor-parallel degree: 1, 2, 4, 8 or 16")] = 1
    gpu_frac: Annotated[float, Field(gt=0.0, le=1.0, description="share of one GPU; below 1 only with tp=1")] = 1.0
    replicas: Annotated[int, Field(ge=1)] = 1
    max_num_seqs: Annotated[int, Field(ge=1)] | None = None
    max_batched_tokens: Annotated[int, Field(ge=16)] | None = None
    # the engine's output parsers, overriding the model catalog's (names as the plan's engine spells them;
    # `none` turns the catalog's off); the engine adapters check the names when the plan is served
    tool_call_parser: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    reasoning_parser: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    chat_template: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    # calls/s one replica of this configuration carries at capacity (the planner writes its profile's); the
    # gateway and the simulator share a mixed group's calls in proportion to it
    capacity_rps: Annotated[float, Field(gt=0.0, le=1e9)] | None = None

    @model_validator(mode="after")
    def _shape(self) -> "LLMAlloc":
        if limits.REPLICAS.exceeded(self.replicas):
            raise ValueError(f"replicas={self.replicas:,}; {limits.REPLICAS.hint()}")
        if self.max_num_seqs is not None and self.max_num_seqs > MAX_NUM_SEQS:
            raise ValueError(f"max_num_seqs={self.max_num_seqs:,}; at most {MAX_NUM_SEQS:,}")
        if self.max_batched_tokens is not None and limits.TOKENS.exceeded(self.max_batched_tokens):
            raise ValueError(f"max_batched_tokens={self.max_batched_tokens:,}; {limits.TOKENS.hint()}")
        if self.tp not in TP_DEGREES:
            raise ValueError(f"tp={self.tp} is not one of {', '.join(map(str, TP_DEGREES))}")
        if self.gpu_frac < 1.0 and self.tp > 1:
            raise ValueError(f"gpu_frac={self.gpu_frac:g} needs tp=1 (fractional instances share one GPU); "
                             f"use gpu_frac: 1 with tp={self.tp}, or tp: 1")
        return self

    @property
    def gpus(self) -> float:
        """GPUs this deployment occupies (fractions counted as fractions)."""
        return self.replicas * self.tp * self.gpu_frac

    def engine_key(self) -> tuple[Any, ...]:
        """What makes two groups of one LLM different engines: tp, share and scheduler limits."""
        return (self.tp, round(self.gpu_frac, 6), self.max_num_seqs, self.max_batched_tokens)

    def describe(self) -> str:
        """`tp=4` or `gpu_frac=0.5`, as messages name a configuration."""
        return f"tp={self.tp}" if self.gpu_frac >= 1.0 else f"gpu_frac={self.gpu_frac:g}"


MAX_GROUPS = 8   # configurations one LLM may mix


def _entry_tag(value: Any) -> str:
    return "groups" if isinstance(value, (list, tuple)) else "one"


# One allocation entry: a mapping (one configuration) or a list of them (a mixed group).
AllocEntry = Annotated[
    Union[
        Annotated[LLMAlloc, Tag("one")],
        Annotated[list[LLMAlloc], Field(min_length=1, max_length=MAX_GROUPS), Tag("groups")],
    ],
    Discriminator(_entry_tag),
]
Entry = Union[LLMAlloc, Sequence[LLMAlloc]]


def groups_of(entry: Entry) -> list[LLMAlloc]:
    """The configurations of one allocation entry, in the order written (one for a mapping)."""
    return [entry] if isinstance(entry, LLMAlloc) else list(entry)


def as_groups(allocation: Mapping[str, Entry]) -> dict[str, list[LLMAlloc]]:
    """Every entry of an allocation as its list of configurations."""
    return {llm: groups_of(e) for llm, e in allocation.items()}


def replicas_of(entry: Entry) -> int:
    """Replicas of one allocation entry, all groups together."""
    return sum(g.replicas for g in groups_of(entry))


def replica_groups(entry: Entry) -> list[LLMAlloc]:
    """The configuration of each replica, by replica number (group by group, in the order written)."""
    return [g for g in groups_of(entry) for _ in range(g.replicas)]


def iter_instances(allocation: Mapping[str, Entry]) -> Iterator[tuple[str, int, LLMAlloc]]:
    """(llm, replica number, its configuration) for every instance of an allocation."""
    for llm, entry in allocation.items():
        for r, g in enumerate(replica_groups(entry)):
            yield llm, r, g


def single_group(entry: Entry) -> LLMAlloc | None:
    """The one configuration of an entry, None for a mixed group of several."""
    gs = groups_of(entry)
    return gs[0] if len(gs) == 1 else None


class GPUBudget(SpecModel):
    """The GPUs a plan runs on."""

    type: str
    count: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _bounded(self) -> "GPUBudget":
        if limits.GPUS.exceeded(self.count):
            raise ValueError(f"count={self.count:,}; {limits.GPUS.hint()}")
        return self


PLAN_SCHEMA_VERSION = 1
# an allocation key is served under its name (several workflows: WORKFLOW/LLM)
ALLOC_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


class Plan(SpecModel):
    """A plan file. Sections beyond the allocation are written by later stages and kept as given."""

    # written into every plan; a hand-made plan may leave it out (it is then this version)
    schema_version: int = PLAN_SCHEMA_VERSION
    workflow: str | None = None
    workflows: list[str] | None = None
    gpus: GPUBudget
    allocation: Annotated[dict[str, AllocEntry], Field(min_length=1)]
    target: Target | None = None
    predicted: dict[str, Any] | None = None
    solver: dict[str, Any] | None = None
    placement: list[PlacementEntry] | None = None
    # several workflows: per workflow, which deployment (allocation key) serves each of its LLMs
    routes: dict[str, dict[str, str]] | None = None
    provenance: dict[str, Any] | None = None
    notes: str = ""

    def groups(self) -> dict[str, list[LLMAlloc]]:
        """Every LLM's configurations (one for a plain entry)."""
        return as_groups(self.allocation)


def gpus_needed(allocation: Mapping[str, Entry]) -> int:
    """Whole GPUs an allocation occupies: tp·replicas for whole instances plus packed fractions."""
    groups = [g for gs in as_groups(allocation).values() for g in gs]
    whole = sum(a.tp * a.replicas for a in groups if a.gpu_frac >= 1.0)
    fracs = [a.gpu_frac for a in groups if a.gpu_frac < 1.0 for _ in range(a.replicas)]
    return whole + gpus_for_fractions(fracs)


def _group_problems(plan: Plan, smap: SourceMap) -> list[str]:
    """A mixed group's configurations must differ, agree on the served model's parsers, and stay within
    the replica limit together."""
    problems: list[str] = []
    for llm, entry in plan.allocation.items():
        gs = groups_of(entry)
        if len(gs) < 2:
            continue
        seen: dict[tuple[Any, ...], int] = {}
        for i, g in enumerate(gs):
            j = seen.setdefault(g.engine_key(), i)
            if j != i:
                problems.append(f"{smap.where(('allocation', llm, i))}: allocation.{llm}[{i}]: the same configuration "
                                f"({g.describe()}) as allocation.{llm}[{j}]; merge them into one entry with "
                                f"replicas: {gs[j].replicas + g.replicas}")
        for name in ("tool_call_parser", "reasoning_parser", "chat_template"):
            values = {getattr(g, name) for g in gs}
            if len(values) > 1:
                problems.append(f"{smap.where(('allocation', llm))}: allocation.{llm}: the configurations give different "
                                f"{name}s ({', '.join(sorted(repr(v) for v in values))}); one LLM answers one way: give "
                                f"every configuration the same {name}")
        total = replicas_of(entry)
        if limits.REPLICAS.exceeded(total):
            problems.append(f"{smap.where(('allocation', llm))}: allocation.{llm}: {total:,} replicas in all; "
                            f"{limits.REPLICAS.hint()}")
    return problems


def check_plan(plan: Plan, smap: SourceMap, wf: Workflow | None, models: dict[str, ModelSpec],
               gpus: dict[str, GPUSpec]) -> list[str]:
    """Problems of a plan against its workflow, the catalogs and its own GPU budget."""
    # The memory fit is perf's (one check for every caller), and perf sits above spec: imported
    # here, when a plan is checked against the catalogs, an exception the layer contract lists.
    from scepsy_hpc.perf.fit import check_fit, engine_config

    problems: list[str] = []
    for key in plan.allocation:
        if not ALLOC_KEY.fullmatch(str(key)):
            problems.append(f"{smap.where(('allocation', key), key=True)}: allocation: LLM name {str(key)!r} is not usable "
                            f"as an engine's served model name; use 1-128 letters, digits, '.', '_', '-' or '/'")
    if problems:
        return problems
    if plan.schema_version != PLAN_SCHEMA_VERSION:
        problems.append(f"{smap.where(('schema_version',))}: schema_version: {plan.schema_version} is not the plan format "
                        f"this scepsy reads ({PLAN_SCHEMA_VERSION}); re-plan with `scepsy plan`, or write "
                        f"schema_version: {PLAN_SCHEMA_VERSION}")
        return problems
    if plan.gpus.type not in gpus:
        problems.append(f"{smap.where(('gpus', 'type'))}: gpus.type: unknown GPU type {plan.gpus.type!r}; {suggest(plan.gpus.type, gpus)}")
        return problems
    if wf is not None:
        for llm in wf.llms:
            if llm not in plan.allocation:
                problems.append(f"{smap.where(('allocation',), key=True)}: allocation: LLM {llm!r} of workflow {wf.name!r} "
                                f"has no entry; add '{llm}: {{tp: 1, gpu_frac: 1, replicas: 1}}'")
        for llm in plan.allocation:
            if llm not in wf.llms:
                problems.append(f"{smap.where(('allocation', llm), key=True)}: allocation.{llm}: workflow {wf.name!r} has no LLM "
                                f"{llm!r}; {suggest(llm, wf.llms)}")
        for llm, entry in plan.allocation.items():
            if llm not in wf.llms:
                continue
            model = resolve_model(wf, llm, models)
            gs = groups_of(entry)
            for i, alloc in enumerate(gs):
                loc, name = (("allocation", llm), f"allocation.{llm}") if isinstance(entry, LLMAlloc) \
                    else (("allocation", llm, i), f"allocation.{llm}[{i}]")
                try:
                    check_fit(engine_config(alloc, model, gpus[plan.gpus.type]), label=f"LLM {llm!r} ({model.hf_id}) on {plan.gpus.type}")
                except (InfeasibleError, ValueError) as exc:
                    problems.append(f"{smap.where(loc)}: {name}: {exc}")
    problems += _group_problems(plan, smap)
    problems += check_placement(plan, None, smap)
    need = gpus_needed(plan.allocation)
    if need > plan.gpus.count:
        problems.append(f"{smap.where(('gpus', 'count'))}: gpus.count: the allocation needs {need} GPUs "
                        f"but the plan has {plan.gpus.count}; raise gpus.count or lower replicas/tp")
    return problems


def parse_plan(data: Any, smap: SourceMap, wf: Workflow | None, models: dict[str, ModelSpec],
               gpus: dict[str, GPUSpec]) -> Plan:
    """Validate parsed YAML as a plan (against `wf` when given)."""
    return parse_document(Plan, data, smap, "a plan is a mapping with keys gpus, allocation, …",
                          lambda plan: check_plan(plan, smap, wf, models, gpus))


def load_plan(path: str | Path, wf: Workflow | None, models: dict[str, ModelSpec], gpus: dict[str, GPUSpec]) -> Plan:
    """Load and validate a plan file."""
    data, smap = load_yaml(path)
    return parse_plan(data, smap, wf, models, gpus)
