"""Allocation policies — the MILP and the baselines it is measured against — and the three goals.

Every policy maps (planner, rate scale θ) to an Outcome in the same form:

- `equal`: what people write by hand. The GPUs are split evenly among the deployments; each takes
  the smallest tp whose memory fits and as many replicas as fill its share (a share below one
  GPU becomes a fraction). Blind to the load.
- `independent`: what per-model autoscalers do. GPUs are split in proportion to each
  deployment's own GPU-seconds of demand (calls/s ÷ calls/s per GPU at its smallest fitting
  configuration); inside its share each picks the configuration with the lowest mean per-call
  latency that carries its load — blind to how its latency weighs in the workflow.
- `paper-enum`: the paper's hierarchical enumeration with pruning. Deployments are ranked by
  their share of the latency (alp-paper terms); GPU shares are enumerated depth-first in that
  order, a share is pruned when it cannot carry its load; inside a share, replicas first (the
  fewest that carry the load at the smallest fitting tp), then leftover GPUs raise tp, then fill
  with replicas. Each complete assignment is scored by alp-paper; time-capped.
- `milp`: ours (planner.Planner.milp_latency).

Goals: `target` (θ = 1: the workflows' target rates), `max-throughput`, `slo`; see planner.
Baselines meet `max-throughput` by bisecting θ over their own plans (the largest θ where the
plan carries the load at the utilisation cap).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable

from scepsy_hpc.allocate.candidates import Config
from scepsy_hpc.allocate.milp import Candidate
from scepsy_hpc.allocate.planner import Outcome, Planner, used_gpus
from scepsy_hpc.errors import InfeasibleError, SpecError
from scepsy_hpc.predict.alp import pooled_point

POLICIES = ("milp", "equal", "independent", "paper-enum")
PAPER_ENUM_CAP_S = 60.0


def _cand(p: Planner, c: Config, r: int) -> Candidate:
    mu = c.profile.capacity_rps if c.profile is not None else 0.0
    return Candidate(p.gpu_name, c.tp, c.gpu_frac, r, 0.0, r * mu)


def _fits(p: Planner, choice: dict[str, Candidate]) -> bool:
    return used_gpus(choice) <= p.n_gpus


def _shrink_to_fit(p: Planner, choice: dict[str, Candidate], order: list[str]) -> dict[str, Candidate]:
    """Drop replicas (most-replicated first) until the fractions pack within the budget."""
    while not _fits(p, choice):
        name = max(order, key=lambda n: (choice[n].replicas, choice[n].gpus))
        c = choice[name]
        if c.replicas <= 1:
            raise InfeasibleError(f"the shares do not pack onto {p.n_gpus} GPUs")
        choice[name] = Candidate(c.gpu, c.tp, c.gpu_frac, c.replicas - 1, c.cost_s, c.capacity_rps * (c.replicas - 1) / c.replicas)
    return choice


def _in_share(p: Planner, name: str, share: float) -> list[tuple[Config, int]]:
    """(config, replicas) that fit a share of `share` GPUs: fractions at most the share, r·tp·f ≤ share."""
    out = []
    for c in p.deployments[name].configs:
        r = int(math.floor(share / c.gpus + 1e-9))
        if r >= 1:
            out.append((c, r))
    return out


def _quarter_floor(x: float) -> float:
    return math.floor(x * 4 + 1e-9) / 4


def equal(p: Planner, theta: float) -> Outcome:
    """GPUs split evenly; smallest tp that fits; replicas fill the share."""
    names = list(p.deployments)
    base, extra = divmod(p.n_gpus, len(names))
    choice = {}
    for k, name in enumerate(names):
        share = (base + (1 if k < extra else 0)) if base >= 1 else _quarter_floor(p.n_gpus / len(names))
        whole = [c for c in p.deployments[name].configs if c.gpu_frac >= 1.0]
        fitting = [c for c in whole if c.tp <= share] if share >= 1 else \
            [c for c in p.deployments[name].configs if c.gpu_frac <= share]
        if not fitting:
            need = whole[0].tp if whole else p.deployments[name].configs[0].gpus
            raise InfeasibleError(f"equal split: {name} gets {share:g} GPU(s) of {p.n_gpus} but needs {need:g} to fit in memory")
        c = fitting[0] if share >= 1 else max(fitting, key=lambda c: c.gpu_frac)
        choice[name] = _cand(p, c, int(share // c.gpus) if share >= 1 else 1)
    return p.outcome(_shrink_to_fit(p, choice, names), theta, "heuristic")


def _shares(p: Planner, demand: dict[str, float]) -> dict[str, float]:
    """Shares of the budget proportional to `demand`, each at least what the deployment needs to fit,
    whole GPUs (quarter grid below one), largest remainders first."""
    names = list(p.deployments)
    total = sum(demand.values()) or 1.0
    floor_fit = {n: p.deployments[n].configs[0].gpus for n in names}
    raw = {n: p.n_gpus * demand[n] / total for n in names}
    shares = {n: max(floor_fit[n], math.floor(raw[n]) if raw[n] >= 1 else _quarter_floor(raw[n]) or 0.25) for n in names}
    while sum(shares.values()) > p.n_gpus + 1e-9:
        n = max((n for n in names if shares[n] > floor_fit[n]), key=lambda n: shares[n] - raw[n], default=None)
        if n is None:
            raise InfeasibleError(f"the deployments need {sum(floor_fit.values()):g} GPUs to fit in memory; {p.n_gpus} given")
        shares[n] = max(floor_fit[n], shares[n] - (1 if shares[n] > 1 else 0.25))
    left = p.n_gpus - sum(shares.values())
    for n in sorted(names, key=lambda n: raw[n] - shares[n], reverse=True):
        step = math.floor(left + 1e-9)
        if step >= 1 and raw[n] > shares[n]:
            add = min(step, max(1, math.ceil(raw[n] - shares[n])))
            shares[n] += add
            left -= add
    return shares


def independent(p: Planner, theta: float) -> Outcome:
    """Shares by GPU-seconds of demand; each deployment minimises its own per-call latency inside its share."""
    loads = p.loads(theta)
    demand = {}
    for name, d in p.deployments.items():
        c0 = next((c for c in d.configs if c.gpu_frac >= 1.0), d.configs[0])
        per_gpu = (c0.profile.capacity_rps / c0.gpus) if c0.profile is not None else 1.0
        demand[name] = d.calls / per_gpu if per_gpu > 0 else 0.0
    shares = _shares(p, demand)
    choice = {}
    for name, share in shares.items():
        opts = _in_share(p, name, share)
        if not opts:
            raise InfeasibleError(f"independent split: {name} gets {share:g} GPU(s), too few to fit in memory")
        best, best_lat = None, math.inf
        for c, r in opts:
            if c.profile is None:
                best = (c, r)
                break
            pt = pooled_point(c.profile, loads[name] / r, r) if loads[name] / r < p.max_util * c.profile.capacity_rps else None
            lat = pt.latency_mean_s if pt is not None else math.inf
            if lat < best_lat:
                best, best_lat = (c, r), lat
        if best is None:  # nothing carries the load: the largest capacity
            best = max(opts, key=lambda cr: cr[1] * cr[0].profile.capacity_rps)
        choice[name] = _cand(p, *best)
    return p.outcome(_shrink_to_fit(p, choice, list(shares)), theta, "heuristic")


def _paper_config(p: Planner, name: str, share: float, load: float) -> tuple[Config, int] | None:
    """Replicas first at the smallest tp, leftover GPUs to tp, then replicas fill the share."""
    d = p.deployments[name]
    if share < 1:
        fr = [c for c in d.configs if c.gpu_frac <= share + 1e-9 and c.gpu_frac < 1]
        if not fr:
            return None
        c = max(fr, key=lambda c: c.gpu_frac)
        return (c, 1) if c.profile is None or load < p.max_util * c.profile.capacity_rps else None
    whole = [c for c in d.configs if c.gpu_frac >= 1.0 and c.tp <= share]
    if not whole:
        return None

    def need(c: Config) -> int:
        if c.profile is None or load <= 0:
            return 1
        return max(1, math.ceil(load / (p.max_util * c.profile.capacity_rps) - 1e-9))

    fit = [c for c in whole if need(c) * c.tp <= share]
    if not fit:
        return None
    pick = fit[-1]  # the fewest replicas that carry the load come first; what is left raises tp
    return pick, int(share // pick.tp)


def paper_enum(p: Planner, theta: float, cap_s: float = PAPER_ENUM_CAP_S) -> Outcome:
    """The paper's enumeration (module docstring), scored by alp-paper, stopped after `cap_s`."""
    t0 = time.perf_counter()
    loads = p.loads(theta)
    names = list(p.deployments)
    # rank by latency share: n·L at the smallest configuration, unloaded
    def weight(n: str) -> float:
        d = p.deployments[n]
        c = d.configs[0]
        return d.calls * (c.profile.unloaded.latency_mean_s if c.profile is not None else 0.0)
    names.sort(key=weight, reverse=True)
    grid = [0.25, 0.5, 0.75] + list(range(1, p.n_gpus + 1))
    options: dict[str, list[tuple[float, Config, int]]] = {}
    for n in names:
        seen, opts = set(), []
        for g in grid:
            cr = _paper_config(p, n, g, loads[n])
            if cr is None:
                continue
            key = (cr[0].tp, cr[0].gpu_frac, cr[1])
            if key not in seen:  # a larger share that changes nothing is pruned
                seen.add(key)
                opts.append((cr[0].gpus * cr[1], cr[0], cr[1]))
        if not opts:
            raise p.infeasible(theta)
        options[n] = opts
    min_rest = [sum(min(o[0] for o in options[m]) for m in names[k:]) for k in range(len(names) + 1)]
    best: tuple[float, dict[str, Candidate]] | None = None
    evaluated, capped = 0, False
    stack: list[tuple[int, float, dict[str, Candidate]]] = [(0, 0.0, {})]
    while stack:
        if time.perf_counter() - t0 > cap_s:
            capped = True
            break
        k, used, partial = stack.pop()
        if k == len(names):
            if used_gpus(partial) > p.n_gpus:
                continue
            evaluated += 1
            lat = sum(x.latency_s for x in p.evaluate(partial, theta, "alp-paper").values())
            if best is None or lat < best[0]:
                best = (lat, dict(partial))
            continue
        n = names[k]
        for g, c, r in options[n]:
            if used + g + min_rest[k + 1] <= p.n_gpus + 1e-9:
                stack.append((k + 1, used + g, {**partial, n: _cand(p, c, r)}))
    if best is None:
        raise p.infeasible(theta)
    out = p.outcome(best[1], theta, "feasible (time cap)" if capped else "optimal (enumerated)",
                    solve_time_s=time.perf_counter() - t0, candidates=evaluated)
    if capped:
        out = out.noted(f"paper-enum stopped at its {cap_s:g} s cap after {evaluated} allocations")
    return out


def milp(p: Planner, theta: float) -> Outcome:
    """The MILP policy's plan at rate scale θ (planner.Planner.milp_latency)."""
    return p.milp_latency(theta)


FUNCS: dict[str, Callable[[Planner, float], Outcome]] = {"milp": milp, "equal": equal, "independent": independent,
                                                        "paper-enum": paper_enum}


def plan_at(p: Planner, policy: str, theta: float) -> Outcome:
    """`policy`'s plan at rate scale θ."""
    if policy not in FUNCS:
        raise SpecError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return FUNCS[policy](p, theta)


def _carries(p: Planner, o: Outcome) -> bool:
    """The plan carries its rates at the utilisation cap."""
    return o.status != "under-capacity" and all(
        lp.utilisation <= p.max_util + 1e-6 for pr in o.predictions.values() for lp in pr.per_llm.values())


def max_throughput(p: Planner, policy: str, rel_tol: float = 0.01) -> Outcome:
    """The highest-throughput plan: exact for milp (then the lowest latency at θ·(1 − tol)·max_util:
    the fastest allocation whose predicted capacity is within `p.throughput_tol` of the most),
    bisection over θ for the baselines (the largest θ whose plan carries θ at the utilisation cap)."""
    t0 = time.perf_counter()
    top, res = p.max_scale()
    if policy == "milp":
        out = p.milp_latency(top * (1 - p.throughput_tol) * p.max_util * (1 - 1e-9))
        out = replace(out, solve_time_s=out.solve_time_s + res.solve_time_s)
        tol = f", the lowest-latency allocation within {p.throughput_tol:.0%} of that capacity," if p.throughput_tol > 0 else ""
        out = out.noted(f"the GPUs carry at most {top:.4g}× the target rates at full utilisation (max-rate MILP, "
                        f"{res.status}); planned{tol} at {p.max_util:.0%} of it")
        return _mixed_if_more(p, replace(out, top_choice=dict(res.choice)), top)
    if policy == "equal":  # load-blind: the allocation is fixed; operate at max_util of its capacity
        o = equal(p, 1.0)
        th = p.throughput_scale(o.predictions) * p.max_util
        o = equal(p, th)
        return replace(o, solve_time_s=time.perf_counter() - t0)
    lo, hi, best = 0.0, top, None
    mid = top * p.max_util
    for _ in range(40):
        try:
            o = plan_at(p, policy, mid)
            ok = _carries(p, o)
        except InfeasibleError:
            ok = False
        if ok:
            lo, best = mid, o
        else:
            hi = mid
        if (best is not None and hi - lo <= rel_tol * hi) or hi < top * 1e-3:
            break
        mid = 0.5 * (lo + hi)
    if best is None:
        raise InfeasibleError(f"{policy}: no rate could be carried on {p.n_gpus} {p.gpu_name}")
    return replace(best, solve_time_s=time.perf_counter() - t0)


def _mixed_if_more(p: Planner, single: Outcome, top: float) -> Outcome:
    """Mixed groups when they carry more: the instance bound (configurations of one LLM mixed) is solved
    too; when it exceeds the one-configuration optimum `top` by more than `throughput_tol`, the mixed
    groups planned at that bound (Planner.milp_mixed) replace `single` if alp-cp agrees they carry more."""
    if not p.mixed_groups:
        return single
    t0 = time.perf_counter()
    try:
        inst, counts = p.instance_scale()
    except InfeasibleError:
        return single
    bound_s = time.perf_counter() - t0   # the instance bound's MILP (its model and HiGHS)
    if inst > top * (1 + 1e-9):   # the allocation of the most capacity mixes configurations
        single = replace(single, top_choice=p.instance_choice(counts))
    if not inst > top * (1 + p.throughput_tol):
        return single.noted(f"the instance bound (replicas of unlike configurations of one LLM mixed) is {inst:.4g}×, "
                            f"within {p.throughput_tol:.0%} of the most one configuration per LLM carries: the "
                            f"latency MILP's allocation kept")
    try:
        mixed = p.milp_mixed(inst * (1 - p.throughput_tol) * p.max_util * (1 - 1e-9))
    except InfeasibleError:
        return single
    spent = bound_s + mixed.solve_time_s
    th_single, th_mixed = p.throughput_scale(single.predictions), p.throughput_scale(mixed.predictions)
    if mixed.status == "under-capacity" or not th_mixed > th_single * (1 + p.throughput_tol):
        return replace(single, solve_time_s=single.solve_time_s + spent).noted(
            f"mixed groups (instance bound {inst:.4g}×) were predicted to carry {th_mixed:.4g}× against "
            f"{th_single:.4g}×: the latency MILP's allocation kept")
    return replace(mixed, solve_time_s=single.solve_time_s + spent, notes=single.notes, top_choice=single.top_choice).noted(
        f"mixed groups carry {inst:.4g}× at full utilisation (the instance bound), {inst / top:.3f}× one configuration "
        f"per LLM; planned at {p.max_util:.0%} of it (alp-cp: {th_mixed:.4g}× against {th_single:.4g}×)")


def under_slo(p: Planner, policy: str, slo_s: float, rel_tol: float = 0.01) -> Outcome:
    """The highest rate scale whose `policy` plan meets the latency SLO in every workflow."""
    if slo_s <= 0:
        raise SpecError(f"--latency-slo {slo_s:g}: the SLO must be positive seconds")
    t0 = time.perf_counter()
    top, _ = p.max_scale()

    def meets(o: Outcome) -> bool:
        return _carries(p, o) and all(pr.latency_s <= slo_s for pr in o.predictions.values())

    hi = top * p.max_util * (1 - 1e-9)
    o = _try(p, policy, hi)
    if o is not None and meets(o):
        return replace(o, solve_time_s=time.perf_counter() - t0)
    lo_th = hi * 1e-3
    low = _try(p, policy, lo_th)
    if low is None or not meets(low):
        fastest = min((pr.latency_s for pr in low.predictions.values()), default=math.inf) if low else math.inf
        raise InfeasibleError(f"no rate meets the {slo_s:g} s SLO on {p.n_gpus} {p.gpu_name} with {policy}: even nearly "
                              f"unloaded the predicted latency is {fastest:.3g} s (raise the SLO or the GPUs)")
    lo, best = lo_th, low
    while hi - lo > rel_tol * hi:
        mid = math.sqrt(lo * hi) if hi / lo > 4 else 0.5 * (lo + hi)
        o = _try(p, policy, mid)
        if o is not None and meets(o):
            lo, best = mid, o
        else:
            hi = mid
    return replace(best, solve_time_s=time.perf_counter() - t0)


def _try(p: Planner, policy: str, theta: float) -> Outcome | None:
    try:
        return plan_at(p, policy, theta)
    except InfeasibleError:
        return None


def run(p: Planner, policy: str, mode: str, slo_s: float | None = None) -> Outcome:
    """`policy` under goal `mode` ("target" | "max-throughput" | "slo"), as the predictor sees it (the
    simulator check of the milp plan is planning's: planning.policy.run)."""
    if policy not in FUNCS:
        raise SpecError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if mode == "target":
        return plan_at(p, policy, 1.0)
    if mode == "max-throughput":
        return max_throughput(p, policy)
    if mode == "slo":
        if slo_s is None:
            raise SpecError("the slo goal needs --latency-slo SECONDS")
        return under_slo(p, policy, slo_s)
    raise SpecError(f"unknown goal {mode!r}; one of target, max-throughput, slo")


__all__ = ["POLICIES", "run", "plan_at", "max_throughput", "under_slo", "equal", "independent", "paper_enum", "milp"]
