"""A PlanResult as a plan file (`Plan`) and as the JSON summary `scepsy plan --json` prints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scepsy_hpc.planning.request import PlanResult
    from scepsy_hpc.spec.plan import Plan


def to_plan(result: PlanResult) -> Plan:
    """The plan file content."""
    from scepsy_hpc.allocate.allocation import as_allocation
    from scepsy_hpc.spec.plan import GPUBudget, Plan
    from scepsy_hpc.spec.workflow import Target

    planner, out, req = result.planner, result.outcome, result.request
    policy, mode, slo = req.policy, result.goal, result.latency_slo_s
    single = len(planner.demands) == 1
    alloc = as_allocation(out.choice)
    names = [dm.wf.name for dm in planner.demands]
    rate = out.rates[names[0]]
    target = Target(throughput_rps=round(rate, 6), latency_slo_s=slo) if single else None
    routes = None if single else {dm.wf.name: {llm: planner.dep_of[i, llm] for llm in dm.wf.llms}
                                  for i, dm in enumerate(planner.demands)}
    caps = request_caps(result)
    predicted = {w: {"rate_rps": round(out.rates[w], 6), "latency_s": _r(p.latency_s), "throughput_rps": _r(p.throughput_rps),
                     "bottleneck": p.bottleneck_llm, "predictor": p.predictor,
                     **({"max_requests": caps[w]} if w in caps else {})} for w, p in out.predictions.items()}
    solver = {"policy": policy, "goal": mode, "status": out.status, "solve_time_s": round(out.solve_time_s, 4),
              "iterations": out.iterations, "candidates": out.candidates, "max_util": planner.max_util,
              "time_limit_s": planner.time_limit_s, "notes": list(out.notes)}
    if out.checked:
        solver["sim_check_s"] = round(out.check_time_s, 2)
    provenance: dict[str, Any] = {"profiles": req.profiles_dir or "synthetic (performance model)",
                                  "statistics": req.trace or f"program samples ({req.samples}, seed {req.seed})"}
    if req.workflow_files:
        provenance["workflow_file"] = req.workflow_files[0] if single else list(req.workflow_files)
    plan = Plan(workflow=names[0] if single else None, workflows=None if single else names,
                gpus=GPUBudget(type=planner.gpu_name, count=planner.n_gpus), allocation=alloc, target=target,
                predicted=predicted[names[0]] if single else predicted, solver=solver, routes=routes, provenance=provenance,
                notes=f"planned by `scepsy plan --policy {policy}` ({mode})")
    if result.placement is not None:
        plan = plan.model_copy(update={"placement": result.placement.entries()})
    return plan


def request_caps(result: PlanResult) -> dict[str, int]:
    """Per workflow whose calls continue conversations, the gateway's request cap for the plan
    (gateway/admission.py): the requests in flight at the point a `--max-throughput` plan is planned at,
    `max_util` × (1 − `throughput_tol`) of the plan's predicted capacity (Little's law: rate × predicted
    latency there).

    Past capacity, conversations continued on a prefix cache can collapse the deployment (README roadmap 3);
    held to this many requests it keeps its capacity. Where they do not collapse it the figure costs throughput
    (react_agent: 0.71×, `scripts/bench_request_cap.py`), so `scepsy up` applies it only when asked. Measured in the simulator (8 GPUs, each workflow's
    max-throughput plan): plan_execute (cap 200) at 2.5 rps offered serves 2.02 rps against 0.75 uncapped
    (caps 150 / 175 / 190 / 210 / 220 / 229: 1.82 / 1.98 / 2.02 / 1.95 / 1.76 / 1.54), supervisor_agents (190)
    at its planned 2.46 rps serves 2.39 at 90 s against 0.60 at 327 s uncapped. Workflows without
    conversations do not collapse and a cap only costs them (rag_rerank with the figure it would have, 50:
    1.77 rps served against 2.03 at 1.3× its predicted capacity), so they get none. None either
    where the predictor gives no finite capacity or latency."""
    from scepsy_hpc.spec.workflow import continues_conversations

    planner, out = result.planner, result.outcome
    talking = [dm for dm in planner.demands if continues_conversations(dm.wf)]
    top = planner.throughput_scale(out.predictions)
    if not talking or not 0 < top < math.inf:
        return {}
    theta = top * planner.max_util * (1.0 - result.request.throughput_tol)
    at = planner.evaluate(out.choice, theta)   # one predictor call, as one MILP iteration makes
    caps: dict[str, int] = {}
    for dm in talking:
        w = dm.wf.name
        n = theta * dm.weight_rps * at[w].latency_s
        if math.isfinite(n) and n > 0:
            caps[w] = max(1, math.ceil(n))
    return caps


def _r(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


def summarise(result: PlanResult, plot: str | None = None, plan_file: str | None = None) -> dict[str, Any]:
    """The JSON form: status, allocation, predicted, gpus_used, solve_time_s, per-LLM rows; the
    placement and its fragmentation with a cluster; where the CLI drew the placement (`plot`) and
    wrote the plan (`plan_file`); the simulated figures when asked for."""
    from scepsy_hpc.allocate.allocation import as_json, describe
    from scepsy_hpc.allocate.planner import used_gpus

    planner, out = result.planner, result.outcome
    used = used_gpus(out.choice)
    per_llm = []
    for d, c in out.choice.items():
        dep = planner.deployments[d]
        i, llm = dep.members[0]
        p = out.predictions[planner.demands[i].wf.name].per_llm.get(llm)
        spec = planner.demands[i].wf.llms[llm].model
        per_llm.append({"llm": d, "model": spec if isinstance(spec, str) else dep.model.hf_id, "tp": c.tp, "gpu_frac": c.gpu_frac, "replicas": c.total_replicas,
                        **({"groups": describe(c)} if c.more else {}),
                        "gpus": c.gpus, "load_rps": p.load_rps * c.total_replicas if p else 0.0,
                        "capacity_rps": p.capacity_rps if p else 0.0, "utilisation": p.utilisation if p else 0.0,
                        "call_latency_s": p.call_latency_s if p else 0.0,
                        "critical_path_s": sum(out.predictions[planner.demands[j].wf.name].per_llm[m].stage_s
                                               for j, m in dep.members if m in out.predictions[planner.demands[j].wf.name].per_llm)})
    caps = request_caps(result)
    preds = {w: {"rate_rps": out.rates[w], "latency_s": p.latency_s, "throughput_rps": p.throughput_rps,
                 "bottleneck": p.bottleneck_llm, "tool_s": p.tool_s, "max_requests": caps.get(w)}
             for w, p in out.predictions.items()}
    first = next(iter(preds.values()))
    summary: dict[str, Any] = {
        "status": out.status, "policy": result.request.policy, "goal": result.goal,
        "allocation": {d: as_json(c) for d, c in out.choice.items()},
        "predicted": {"latency_s": first["latency_s"], "throughput_rps": first["throughput_rps"],
                      "rate_rps": first["rate_rps"], "per_workflow": preds,
                      "max_requests": sum(caps.values()) if len(caps) == len(preds) else None},
        "gpus_used": used, "gpus_free": planner.n_gpus - used, "gpus_total": planner.n_gpus, "gpu_type": planner.gpu_name,
        "solve_time_s": out.solve_time_s, "iterations": out.iterations, "candidates": out.candidates,
        "per_llm": per_llm, "notes": list(out.notes),
        "sim_check": {"time_s": out.check_time_s, "allocations": [c.to_dict() for c in out.checked]} if out.checked else None,
    }
    if result.placement is not None:
        summary["placement"] = result.placement.as_list()
        summary["fragmentation"] = result.placement.fragmentation.as_dict()
        summary["cluster"] = result.request.cluster_ref
        if plot is not None:
            summary["plot"] = plot
    if plan_file is not None:
        summary["plan_file"] = plan_file
    if result.simulated is not None:
        summary["simulated"] = dict(result.simulated)
    return summary


def write_plan(plan: Plan, path: str | Path) -> None:
    """Write the plan as YAML (readable back by `load_plan`)."""
    import yaml

    from scepsy_hpc.spec.records import write_atomic

    data = plan.model_dump(exclude_none=True, mode="json")
    write_atomic(path, "# written by `scepsy plan`; edit freely: a hand-edited plan is validated like any other\n"
                 + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
