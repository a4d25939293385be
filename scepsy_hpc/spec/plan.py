"""Plan file (DESIGN.md §3.4), allocation part: per LLM `tp`, `gpu_frac`, `replicas` on `gpus`.

Written by `scepsy plan`, read by `simulate`/`up`; a hand-written plan is the user-specified
allocation and goes through the same validation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, model_validator

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
    allocation: Annotated[dict[str, LLMAlloc], Field(min_length=1)]
    target: Target | None = None
    predicted: dict[str, Any] | None = None
    solver: dict[str, Any] | None = None
    placement: list[PlacementEntry] | None = None
    # several workflows: per workflow, which deployment (allocation key) serves each of its LLMs
    routes: dict[str, dict[str, str]] | None = None
    provenance: dict[str, Any] | None = None
    notes: str = ""


def gpus_needed(allocation: dict[str, LLMAlloc]) -> int:
    """Whole GPUs an allocation occupies: tp·replicas for whole instances plus packed fractions."""
    whole = sum(a.tp * a.replicas for a in allocation.values() if a.gpu_frac >= 1.0)
    fracs = [a.gpu_frac for a in allocation.values() if a.gpu_frac < 1.0 for _ in range(a.replicas)]
    return whole + gpus_for_fractions(fracs)


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
        for llm, alloc in plan.allocation.items():
            if llm not in wf.llms:
                continue
            model = resolve_model(wf, llm, models)
            try:
                check_fit(engine_config(alloc, model, gpus[plan.gpus.type]), label=f"LLM {llm!r} ({model.hf_id}) on {plan.gpus.type}")
            except (InfeasibleError, ValueError) as exc:
                problems.append(f"{smap.where(('allocation', llm))}: allocation.{llm}: {exc}")
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
