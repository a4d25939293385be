"""`plan(PlanRequest) -> PlanResult`: the one way `scepsy plan`, `bench`, `up` (and the daemon) plan.

Steps: the GPU budget (from the request, or the cluster's free GPUs and NVLink domains), the goal
(given, or from the workflows' targets), the planner over the workflows' sampled programs (or a
trace), the policy under the goal with the simulator check of the milp plan, placement on the
cluster with re-plans around what does not place, and optionally a simulation of the plan.
Nothing given is changed: the planner is copied for each budget (`Planner.with_budget`), and
outcomes are new values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from scepsy_hpc.errors import ScepsyError, SpecError
from scepsy_hpc.planning.request import DEFAULT_GPU_TYPE, DEFAULT_MAX_TP, PlanRequest, PlanResult

if TYPE_CHECKING:
    from scepsy_hpc.allocate.planner import Outcome, Planner
    from scepsy_hpc.place.placement import Placement
    from scepsy_hpc.planning.simcheck import SimCheck
    from scepsy_hpc.spec.catalog import GPUSpec
    from scepsy_hpc.spec.cluster import ClusterSpec
    from scepsy_hpc.topology.model import Topology

MAX_REPLANS = 6


@dataclass(frozen=True)
class Budget:
    """The GPUs a plan may use: type, count, largest tp, and the topology to place on (or None)."""

    gpu_type: str
    count: int
    max_tp: int
    topology: Topology | None


def plan(request: PlanRequest, *, planner: Planner | None = None,
         progress: Callable[[str], None] | None = None) -> PlanResult:
    """Plan `request` (see the module docstring). `planner`: one made by `prepare` for this request's
    workflows, rates and tuning, reused across GPU counts and policies (its profiles are the slow
    part); it is not changed. `progress` hears what is being profiled and checked."""
    _check(request)
    budget = resolve_budget(request)
    mode, slo = resolve_goal(request)
    base = planner if planner is not None else prepare(request, budget, progress)
    p = base.with_budget(n_gpus=budget.count) if base.n_gpus != budget.count else base
    check = sim_check(request)
    placement = None
    if budget.topology is not None:
        out, placement, p = plan_and_place(p, request.policy, mode, slo, budget.topology, check, request.rate_scale)
    else:
        from scepsy_hpc.planning.policy import run

        out = run(p, request.policy, mode, slo, check, rate_scale=request.rate_scale)
    result = PlanResult(request=request, planner=p, outcome=out, goal=mode, latency_slo_s=slo, placement=placement,
                        topology=budget.topology)
    if request.simulate_requests is not None:
        result = PlanResult(request=request, planner=p, outcome=out, goal=mode, latency_slo_s=slo, placement=placement,
                            topology=budget.topology, simulated=simulate_plan(result, request.simulate_requests))
    return result


def _check(request: PlanRequest) -> None:
    names = [wf.name for wf in request.workflows]
    if not names:
        raise SpecError("give at least one workflow to plan")
    if len(set(names)) != len(names):
        raise SpecError(f"workflow {', '.join(sorted({n for n in names if names.count(n) > 1}))} is given twice")
    if request.trace and len(names) > 1:
        raise SpecError("--trace describes one workflow; plan several workflows from their programs")
    if request.simulate_requests is not None and len(names) != 1:
        raise SpecError("--simulate runs one workflow; plan them one at a time to simulate")
    unknown = sorted(set(request.target_rps) - set(names))
    if unknown:
        raise SpecError(f"--target-rps: no workflow {unknown[0]!r} among {', '.join(names)}")
    bad = [f"{n}={r:g}" for n, r in request.target_rps.items() if not r > 0]
    if bad:
        raise SpecError(f"--target-rps {','.join(bad)}: rates must be positive")


def weights(request: PlanRequest) -> dict[str, float]:
    """Per workflow, the rate it is planned for: the request's, else its target's, else 1 rps."""
    return {wf.name: request.target_rps.get(wf.name) or (wf.target.throughput_rps if wf.target and wf.target.throughput_rps else 1.0)
            for wf in request.workflows}


def prepare(request: PlanRequest, budget: Budget | None = None, progress: Callable[[str], None] | None = None) -> Planner:
    """A Planner for the request's workflows (sampled programs, or the trace for one workflow):
    every deployment profiled at every configuration that fits."""
    from scepsy_hpc.allocate.planner import Demand, Planner
    from scepsy_hpc.planning.inputs import load_workload

    budget = budget or resolve_budget(request)
    w = weights(request)
    demands = []
    for wf in request.workflows:
        work = load_workload(wf, request.trace, request.samples, request.seed)
        demands.append(Demand(wf, w[wf.name], work.mix, work.seqs, list(work.graphs)))
    return Planner(demands, request.models, request.gpus, budget.gpu_type, budget.count, max_tp=budget.max_tp,
                   max_util=request.max_util, throughput_tol=request.throughput_tol, profiles_dir=request.profiles_dir,
                   seed=request.seed, time_limit_s=request.time_limit_s, gap=request.gap, progress=progress,
                   mixed_groups=request.mixed_groups)


def sim_check(request: PlanRequest) -> SimCheck | None:
    """The simulator check of the milp plan, unless the request turns it off; the throughput goal's
    race only with sim_check_throughput."""
    if not request.sim_check:
        return None
    from scepsy_hpc.planning.simcheck import SimCheck

    return SimCheck(seed=request.seed, throughput=request.sim_check_throughput)


def resolve_goal(request: PlanRequest) -> tuple[str, float | None]:
    """(goal, latency SLO): the request's, else target when every workflow has a rate, else slo
    when they share one latency SLO."""
    if request.goal is not None:
        if request.goal == "slo" and request.latency_slo_s is None:
            raise SpecError("the slo goal needs --latency-slo SECONDS")
        if request.goal not in ("target", "max-throughput", "slo"):
            raise SpecError(f"unknown goal {request.goal!r}; one of target, max-throughput, slo")
        return request.goal, request.latency_slo_s if request.goal == "slo" else None
    if request.target_rps:
        return "target", None
    workflows = request.workflows
    no_rate = [wf.name for wf in workflows if not (wf.target and wf.target.throughput_rps)]
    if not no_rate:
        return "target", None
    slos = {wf.target.latency_slo_s for wf in workflows if wf.target and wf.target.latency_slo_s}
    if len(slos) == 1 and len(no_rate) == len(workflows):
        return "slo", slos.pop()
    raise SpecError(f"workflow(s) {', '.join(no_rate)} have no target throughput_rps; give --target-rps RPS, "
                    f"--latency-slo SECONDS or --max-throughput")


def resolve_budget(request: PlanRequest) -> Budget:
    """GPU type, count, largest tp and topology from the request's cluster or its gpu_type/gpu_count."""
    from scepsy_hpc.topology.build import from_cluster

    gpus = request.gpus
    gpu_type, count, max_tp, topo = request.gpu_type, request.gpu_count, request.max_tp, None
    if request.cluster is not None:
        spec = request.cluster
        ref = request.cluster_ref or spec.name
        topo = from_cluster(spec, gpus) if spec.node_groups else discovered_topology(spec, gpus, gpu_type)
        counts: dict[str, int] = {}
        for n in topo.nodes:
            counts[n.gpu_type] = counts.get(n.gpu_type, 0) + sum(len(d) for d in n.free())
        if gpu_type is None:
            if len(counts) > 1:
                raise SpecError(f"{ref}: the cluster has GPU types {', '.join(f'{g} ({n})' for g, n in counts.items())}; "
                                f"a plan uses one type: pick it with --gpu-type")
            gpu_type = next(iter(counts))
        if gpu_type not in counts:
            raise SpecError(f"--gpu-type {gpu_type}: cluster {spec.name!r} has no such GPUs; it has {', '.join(counts)}")
        count = min(count, counts[gpu_type]) if count else counts[gpu_type]
        domain = max(len(d) for n in topo.nodes if n.gpu_type == gpu_type for d in n.free())
        max_tp = min(max_tp or domain, domain)
    if not count:
        raise SpecError("give the GPUs to plan on: --gpus N (with --gpu-type TYPE) or --cluster CLUSTER.yaml")
    gpu_type = gpu_type or DEFAULT_GPU_TYPE
    if gpu_type not in gpus:
        from scepsy_hpc.spec.source import suggest
        raise SpecError(f"--gpu-type {gpu_type}: unknown GPU type; {suggest(gpu_type, gpus)}")
    return Budget(gpu_type, count, max_tp or DEFAULT_MAX_TP, topo)


def discovered_topology(spec: ClusterSpec, gpus: Mapping[str, GPUSpec], gpu_type: str | None) -> Topology:
    """The usable GPU nodes of the cluster spec's Slurm partition, with their free GPUs."""
    from scepsy_hpc.topology.build import catalog_type, from_slurm
    from scepsy_hpc.topology.discover import discover
    from scepsy_hpc.topology.model import Topology

    assert spec.slurm is not None  # a cluster spec without node_groups has slurm: (spec.cluster checks it)
    network, nodes = discover(partition=spec.slurm.partition)
    parts, unmapped = [], []
    for sn in nodes:
        if sn.gpus <= 0 or not sn.usable:
            continue
        try:
            kind = catalog_type(sn.gpu_type, gpus, spec.slurm.gpu_types)
        except ScepsyError as exc:
            unmapped.append(exc)
            continue
        if gpu_type is None or kind == gpu_type:
            parts += from_slurm([sn], network, kind, gpus[kind].mem_gib, default_nvlink=spec.slurm.nvlink).nodes
    if not parts and unmapped:
        raise unmapped[0]
    if not parts:
        raise SpecError(f"partition {spec.slurm.partition!r} of cluster {spec.name!r} has no usable GPU nodes"
                        + (f" with {gpu_type}" if gpu_type else "") + " (see `scepsy topology show --slurm`)")
    return Topology(tuple(parts), network)


def plan_and_place(planner: Planner, policy: str, mode: str, slo: float | None, topo: Topology,
                   check: SimCheck | None = None, rate_scale: float = 1.0) -> tuple[Outcome, Placement, Planner]:
    """(Outcome, Placement, the planner it was planned on). The MILP gets the NVLink-domain caps of
    the topology (constraint (6)); when a placement still fails, the failing shape's cap drops to
    what did fit (a failing fraction takes one GPU off the budget) and the planner solves again, up
    to MAX_REPLANS times. `planner` is not changed: each re-plan runs on a copy with the new budget."""
    from scepsy_hpc.place import placement as placement_mod
    from scepsy_hpc.allocate.allocation import as_allocation
    from scepsy_hpc.planning.policy import run

    p = planner.with_budget(domain_caps=placement_mod.domain_caps(topo, planner.gpu_name, planner.max_tp))
    notes: list[str] = []
    for attempt in range(MAX_REPLANS + 1):
        out = run(p, policy, mode, slo, check, rate_scale=rate_scale)
        alloc = as_allocation(out.choice)
        try:
            # looked up on the module at each call, so a test can inject placement failures
            placement = placement_mod.place(alloc, topo, gpu_type=p.gpu_name)
        except placement_mod.PlacementError as exc:
            w = exc.want
            if policy != "milp" or w is None or attempt == MAX_REPLANS:
                hint = "" if policy == "milp" else "; the milp policy re-plans around such failures"
                raise placement_mod.PlacementError(f"{exc} (after {attempt} re-plan(s){hint})", w, exc.placed_of_shape) from None
            if w.gpu_frac >= 1.0:
                cap = min(p.domain_caps.get(w.tp, math.inf), exc.placed_of_shape)
                p = p.with_budget(domain_caps={**p.domain_caps, w.tp: int(cap)})
                notes.append(f"placement failed ({exc}); re-planned with at most {int(cap)} group(s) of {w.tp} "
                             f"GPUs inside NVLink domains")
            else:
                p = p.with_budget(n_gpus=p.n_gpus - 1)
                notes.append(f"placement failed ({exc}); re-planned on {p.n_gpus} GPUs")
            continue
        return out.noted(*notes), placement, p
    raise AssertionError("unreachable")


def simulate_plan(result: PlanResult, n_requests: int) -> dict[str, Any]:
    """The simulator's figures for the plan at its planned rate (one workflow)."""
    from scepsy_hpc.sim import simulate

    planner, out = result.planner, result.outcome
    if len(planner.demands) != 1:
        raise SpecError("--simulate runs one workflow; plan them one at a time to simulate")
    wf = planner.demands[0].wf
    rate = out.rates[wf.name]
    res = simulate(wf, result.allocation, planner.gpus[planner.gpu_name], planner.models, rate_rps=rate,
                   n_requests=n_requests, seed=result.request.seed)
    return {"rate_rps": rate, "requests": res.requests, "completed": res.completed, "throughput_rps": res.throughput_rps,
            "latency_mean_s": res.latency_mean_s, "latency_p99_s": res.latency_p99_s}
