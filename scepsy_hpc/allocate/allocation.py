"""A chosen allocation (deployment → Candidate) as the plan format's allocation entries."""

from __future__ import annotations

from typing import Any, Mapping

from scepsy_hpc.allocate.milp import Candidate
from scepsy_hpc.spec.plan import LLMAlloc


def as_entry(c: Candidate) -> LLMAlloc | list[LLMAlloc]:
    """One deployment's entry: a mapping for one configuration; for a mixed group a list, each configuration
    with the calls/s one replica carries (`capacity_rps`: the weight the gateway and the simulator route by)."""
    if not c.more:
        return LLMAlloc(tp=c.tp, gpu_frac=c.gpu_frac, replicas=c.replicas)
    return [LLMAlloc(tp=g.tp, gpu_frac=g.gpu_frac, replicas=g.replicas,
                     capacity_rps=round(g.capacity_rps / g.replicas, 6) if g.capacity_rps > 0 else None)
            for g in c.groups]


def as_allocation(choice: Mapping[str, Candidate]) -> dict[str, Any]:
    """Every deployment's entry (`as_entry`)."""
    return {d: as_entry(c) for d, c in choice.items()}


def as_json(c: Candidate) -> dict[str, Any] | list[dict[str, Any]]:
    """An entry as `--json` prints it."""
    if not c.more:
        return {"tp": c.tp, "gpu_frac": c.gpu_frac, "replicas": c.replicas}
    return [{"tp": g.tp, "gpu_frac": g.gpu_frac, "replicas": g.replicas} for g in c.groups]


def describe(c: Candidate) -> str:
    """`2×tp4` or `2×tp4 + 3×0.5` for tables and notes."""
    return " + ".join(f"{g.replicas}×" + (f"tp{g.tp}" if g.gpu_frac >= 1 else f"{g.gpu_frac:g}") for g in c.groups)
