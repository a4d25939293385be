"""A policy under a goal, then the simulator check of the milp plan (planning.simcheck).

allocate.policies prices allocations with the predictor only; the check that runs the simulator on
the milp policy's plan sits here, above the simulator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scepsy_hpc.errors import SpecError

if TYPE_CHECKING:
    from scepsy_hpc.allocate.planner import Outcome, Planner
    from scepsy_hpc.planning.simcheck import SimCheck


def checked(p: "Planner", check: "SimCheck | None", policy: str, o: "Outcome", goal: str = "latency") -> "Outcome":
    """`o` after the simulator check when the policy is milp and there is a check (else `o`);
    `goal` "throughput" judges the allocations by simulated maximum sustainable rate, "latency" by
    simulated mean latency at the planned rate."""
    if policy != "milp" or check is None:
        return o
    from scepsy_hpc.planning.simcheck import run_check

    return run_check(p, check, o, goal)


def run(p: "Planner", policy: str, mode: str, slo_s: float | None = None, check: "SimCheck | None" = None,
        rate_scale: float = 1.0) -> "Outcome":
    """`policy` under goal `mode` ("target" | "max-throughput" | "slo"), then `check` on milp's plan;
    the target goal plans at `rate_scale` × the workflows' rates."""
    from scepsy_hpc.allocate import policies

    if policy not in policies.FUNCS:
        raise SpecError(f"unknown policy {policy!r}; choose one of {', '.join(policies.POLICIES)}")
    if mode == "target":
        return checked(p, check, policy, policies.plan_at(p, policy, rate_scale))
    if mode == "max-throughput":
        return checked(p, check, policy, policies.max_throughput(p, policy), goal="throughput")
    if mode == "slo":
        if slo_s is None:
            raise SpecError("the slo goal needs --latency-slo SECONDS")
        return checked(p, check, policy, policies.under_slo(p, policy, slo_s))
    raise SpecError(f"unknown goal {mode!r}; one of target, max-throughput, slo")
