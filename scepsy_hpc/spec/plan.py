"""Plan file (DESIGN.md §3.4), allocation part: per LLM `tp`, `gpu_frac`, `replicas` on `gpus`.

Written by `scepsy plan`, read by `simulate`/`up`; a hand-written plan is the user-specified
allocation and goes through the same validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, model_validator

from scepsy_hpc.errors import InfeasibleError
from scepsy_hpc.spec.base import SpecModel
from scepsy_hpc.spec.catalog import GPUSpec, ModelSpec
from scepsy_hpc.spec.fractions import EPS, gpus_for_fractions
from scepsy_hpc.spec.placement_entry import PlacementEntry
from scepsy_hpc.spec.source import SourceMap, load_yaml, parse_document, suggest
from scepsy_hpc.spec.workflow import Target, Workflow, resolve_model

TP_DEGREES = (1, 2, 4, 8, 16)


class LLMAlloc(SpecModel):
    """How one LLM deployment is served: `replicas` instances of `tp` GPUs, or of a `gpu_frac` share."""

    tp: Annotated[int, Field(description="tensor-parallel degree: 1, 2, 4, 8 or 16")] = 1
    gpu_frac: Annotated[float, Field(gt=0.0, le=1.0, description="share of one GPU; below 1 only with tp=1")] = 1.0
    replicas: Annotated[int, Field(ge=1)] = 1
    max_num_seqs: Annotated[int, Field(ge=1)] | None = None
    max_batched_tokens: Annotated[int, Field(ge=16)] | None = None

    @model_validator(mode="after")
    def _shape(self) -> "LLMAlloc":
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


PLAN_SCHEMA_VERSION = 1


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
    problems += _check_placement(plan, smap)
    need = gpus_needed(plan.allocation)
    if need > plan.gpus.count:
        problems.append(f"{smap.where(('gpus', 'count'))}: gpus.count: the allocation needs {need} GPUs "
                        f"but the plan has {plan.gpus.count}; raise gpus.count or lower replicas/tp")
    return problems


def _check_placement(plan: Plan, smap: SourceMap) -> list[str]:
    """A placement, when present, places every instance of the allocation once, on tp GPUs each,
    with fractions per GPU summing to at most 1."""
    if plan.placement is None:
        return []
    problems: list[str] = []
    seen: set[tuple[str, int]] = set()
    share: dict[tuple[str, int], float] = {}
    for k, entry in enumerate(plan.placement):
        where = smap.where(("placement", k))
        llm, rep, gpus = entry.llm, entry.replica, entry.gpus
        if llm not in plan.allocation:
            problems.append(f"{where}: placement[{k}].llm: {llm!r} is not in the allocation; {suggest(str(llm), plan.allocation)}")
            continue
        a = plan.allocation[llm]
        if not 0 <= rep < a.replicas or (llm, rep) in seen:
            problems.append(f"{where}: placement[{k}].replica: {rep!r} is not a free replica number of {llm!r} "
                            f"(0..{a.replicas - 1}, each once)")
            continue
        seen.add((llm, rep))
        if len(gpus) != a.tp:
            problems.append(f"{where}: placement[{k}].gpus: {gpus!r} must list {a.tp} GPU index(es) for tp={a.tp}")
            continue
        for g in gpus:
            key = (entry.node, g)
            share[key] = share.get(key, 0.0) + a.gpu_frac
            if share[key] > 1.0 + EPS:
                problems.append(f"{where}: placement[{k}]: GPU {g} of node {key[0]} is given out beyond its whole "
                                f"(Σ gpu_frac = {share[key]:g})")
    missing = [f"{m}·{r}" for m, a in plan.allocation.items() for r in range(a.replicas) if (m, r) not in seen]
    if missing:
        problems.append(f"{smap.where(('placement',))}: placement: instance(s) {', '.join(missing[:6])}"
                        f"{' …' if len(missing) > 6 else ''} are not placed; re-run `scepsy plan --cluster` or drop placement:")
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
