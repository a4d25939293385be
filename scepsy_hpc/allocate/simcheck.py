"""The simulator check: the MILP's best allocations, run in the discrete-event simulator.

The predictor prices each LLM by a profile measured with Poisson arrivals of single calls. Some
workflows do not feed their LLMs like that: in step-synchronous ones (beam search with a process
reward model: every step fans out, the scorer waits for the generator, the next step waits for
every score) requests drift into lock-step under load and the scorer receives its calls in
waves, so its calls wait seconds where the profile says tens of milliseconds. No per-LLM term sees
that coupling; the simulator, which runs the workflow's program against every engine at once,
does. So beside the MILP's optimum the planner lists a few other allocations (`shortlist`: the
MILP re-solved under lower utilisation caps, the same GPUs as smaller instances, and the next-best
allocations that split the GPUs differently, constraint (7) of allocate.milp), simulates each at
the planned rate, and keeps the one with the lowest simulated mean latency: the MILP's optimum
unless another beats it by more than `margin`.

The check runs on the planner's GPU type with the engine performance model, with its own seed
(not that of any later `scepsy simulate` or `scepsy bench` run). It applies to one workflow with
a program: several workflows sharing deployments, a trace without a program, and measured
profiles (which the simulator's engine model does not use) skip it with a note.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from scepsy_hpc.spec.plan import LLMAlloc

if TYPE_CHECKING:
    from scepsy_hpc.allocate.milp import Candidate
    from scepsy_hpc.allocate.planner import Planner

DEFAULT_ALTERNATIVES = 3
DEFAULT_CAPS = (0.75, 0.6, 0.45)
SEED_OFFSET = 7919  # the check's arrivals and programs differ from a `simulate`/`bench` run at the same --seed


@dataclass
class Checked:
    """One allocation the check simulated."""

    label: str
    choice: dict[str, "Candidate"]
    predicted_s: float
    simulated_s: float
    throughput_rps: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "allocation": {m: {"tp": c.tp, "gpu_frac": c.gpu_frac, "replicas": c.replicas} for m, c in self.choice.items()},
                "predicted_latency_s": self.predicted_s,
                "simulated_latency_s": self.simulated_s if math.isfinite(self.simulated_s) else None,
                "simulated_throughput_rps": self.throughput_rps}


@dataclass
class SimCheck:
    """How the planner checks its allocations in the simulator.

    caps           lower utilisation caps at which the MILP's optimum is also simulated
    alternatives   next-best allocations (other GPU splits) at the planner's cap to simulate
    calls          simulated LLM calls per allocation; requests = calls ÷ calls per request,
                   clamped to [min_requests, max_requests]
    margin         an alternative replaces the optimum only when its simulated mean latency is
                   lower by more than this fraction (simulation noise must not flip the plan)
    delta          GPUs by which some LLM's share must move between two checked allocations
    """

    alternatives: int = DEFAULT_ALTERNATIVES
    caps: tuple[float, ...] = DEFAULT_CAPS
    calls: int = 300_000
    min_requests: int = 1000
    max_requests: int = 3000
    margin: float = 0.05
    delta: float = 1.0
    seed: int = 0

    def requests_for(self, calls_per_request: float) -> int:
        """Requests per simulation for a workflow making `calls_per_request` LLM calls each."""
        n = int(self.calls / max(calls_per_request, 1.0))
        return max(self.min_requests, min(self.max_requests, n))

    def skip_reason(self, planner: "Planner") -> str | None:
        """Why the check cannot run on this planner's input, or None."""
        if len(planner.demands) != 1:
            return "the simulator check runs one workflow at a time; with several workflows it is off"
        dm = planner.demands[0]
        if dm.seqs is None:
            return "the simulator check needs the workflow's program; planning from a trace, it is off"
        if any(src.profiles_dir is not None for src, _ in planner.sources.values()):
            return "the simulator check models engines, not measured profiles; with --profiles it is off"
        return None

    def simulate(self, planner: "Planner", choice: Mapping[str, "Candidate"], theta: float) -> tuple[float, float]:
        """(simulated mean latency, completed requests/s) of `choice` at rate scale θ."""
        from scepsy_hpc.sim.core import simulate

        dm = planner.demands[0]
        calls = _calls(planner)
        of = {llm: choice[planner.dep_of[0, llm]] for llm in dm.wf.llms}
        alloc = {llm: LLMAlloc(tp=c.tp, gpu_frac=c.gpu_frac, replicas=c.replicas) for llm, c in of.items()}
        res = simulate(dm.wf, alloc, planner.gpus[planner.gpu_name], planner.models, rate_rps=theta * dm.weight_rps,
                       n_requests=self.requests_for(calls), seed=self.seed + SEED_OFFSET)
        return res.latency_mean_s, res.throughput_rps


def shortlist(planner: "Planner", best: Any, check: SimCheck) -> list[tuple[str, dict[str, "Candidate"]]]:
    """(label, allocation) to simulate, duplicates dropped:
    - the MILP's optimum;
    - its optimum with every LLM held to each lower utilisation cap of `check.caps`, and with one
      LLM at a time held to the lowest (the predictor is optimistic under bursty load, so the check
      tries more headroom);
    - each of those with every LLM's GPUs spread over more, smaller instances (the smallest tp that
      fits memory): a burst of calls that lands on few large instances queues longer than the
      Poisson-fed profile says, and the simulator sees it;
    - the `check.alternatives` next-best allocations at the planner's cap that split the GPUs
      differently (constraint (7))."""
    from scepsy_hpc.allocate.milp import choice_key, solve
    from scepsy_hpc.errors import InfeasibleError, SolverError

    out: list[tuple[str, dict[str, "Candidate"]]] = []
    seen: set[tuple[Any, ...]] = set()

    def keep(label: str, choice: Mapping[str, "Candidate"]) -> None:
        if choice_key(choice) not in seen:
            seen.add(choice_key(choice))
            out.append((label, dict(choice)))

    budget = {planner.gpu_name: planner.n_gpus}

    def milp(cands: Mapping[str, list["Candidate"]], exclude: list[dict[str, float]]) -> dict[str, "Candidate"] | None:
        try:
            res = solve(cands, budget, time_limit_s=planner.time_limit_s, gap=planner.gap,
                        domain_caps=planner.domain_caps, exclude=exclude, delta=check.delta)
        except (InfeasibleError, SolverError):
            return None
        best.solve_time_s += res.solve_time_s
        return dict(res.choice)

    theta = best.theta
    keep("optimum", best.choice)
    paths = {i: best.predictions[dm.wf.name].paths for i, dm in enumerate(planner.demands)}
    caps = [c for c in check.caps if c < planner.max_util - 1e-9]
    for cap in caps:
        got = milp(planner.latency_candidates(theta, paths, max_util=cap), [])
        if got is not None:
            keep(f"cap {cap:.0%}", got)
    if caps and len(planner.deployments) > 1:
        loose = planner.latency_candidates(theta, paths)
        tight = planner.latency_candidates(theta, paths, max_util=min(caps))
        for d in planner.deployments:
            got = milp({m: (tight[m] if m == d else cs) for m, cs in loose.items()}, [])
            if got is not None:
                keep(f"{d} at {min(caps):.0%}", got)
    for label, choice in list(out):
        spread = spread_out(planner, choice, theta)
        if spread is not None:
            keep(f"{label}, spread", spread)
    shares = [{m: c.gpus for m, c in best.choice.items()}]
    for k in range(check.alternatives):
        got = milp(best.priced, shares)
        if got is None:
            break
        keep(f"split {k + 2}", got)
        shares.append({m: c.gpus for m, c in got.items()})
    return out


def spread_out(planner: "Planner", choice: Mapping[str, "Candidate"], theta: float) -> dict[str, "Candidate"] | None:
    """`choice` with each whole-GPU deployment's GPUs as instances of the smallest tp that fits its
    memory and carries its load at the planner's cap; None when nothing changes."""
    from scepsy_hpc.allocate.milp import Candidate

    loads = planner.loads(theta)
    out, changed = dict(choice), False
    for m, c in choice.items():
        if c.gpu_frac < 1.0 or c.tp == 1:
            continue
        for cfg in sorted(planner.deployments[m].configs, key=lambda k: k.tp):
            if cfg.gpu_frac < 1.0 or cfg.tp >= c.tp or cfg.profile is None:
                continue
            r = c.tp * c.replicas // cfg.tp
            mu = cfg.profile.capacity_rps
            if r * mu * planner.max_util >= loads[m]:
                out[m] = Candidate(c.gpu, cfg.tp, 1.0, r, 0.0, r * mu)
                changed = True
            break
    return out if changed else None


def run_check(planner: "Planner", best: Any) -> Any:
    """Simulate `best` (the milp policy's Outcome) and its shortlist at its rate scale; return the
    Outcome to keep (see the module docstring)."""
    check = planner.check
    if check is None or best.priced is None:
        return best
    why = check.skip_reason(planner)
    if why is not None:
        best.notes.append(why)
        return best
    t0 = time.perf_counter()
    theta = best.theta
    checked = []
    for label, choice in shortlist(planner, best, check):
        planner.progress(f"simulator check: {label}")
        pred = sum(p.latency_s for p in planner.evaluate(choice, theta).values())
        lat, thr = check.simulate(planner, choice, theta)
        checked.append(Checked(label, choice, pred, lat, thr))
    base = checked[0]
    win = min(checked, key=lambda c: c.simulated_s)
    elapsed = time.perf_counter() - t0
    out = best
    if win is not base and win.simulated_s < base.simulated_s * (1 - check.margin):
        out = planner.outcome(dict(win.choice), theta, best.status, solve_time_s=best.solve_time_s,
                              iterations=best.iterations, candidates=best.candidates, notes=list(best.notes),
                              milp=best.milp, priced=best.priced)
        out.notes.append(f"simulator check: the MILP's optimum simulates at {base.simulated_s:.3g} s mean latency; "
                         f"the {win.label} allocation simulates at {win.simulated_s:.3g} s and is kept "
                         f"({len(checked)} allocations, {check.requests_for(_calls(planner))} requests each, {elapsed:.1f} s)")
    else:
        others = min((c.simulated_s for c in checked[1:]), default=math.nan)
        out.notes.append(f"simulator check: the MILP's optimum simulates at {base.simulated_s:.3g} s mean latency, "
                         f"the best of {len(checked) - 1} others at {others:.3g} s; kept "
                         f"({check.requests_for(_calls(planner))} requests each, {elapsed:.1f} s)")
    out.checked = checked
    out.check_time_s = elapsed
    return out


def _calls(planner: "Planner") -> float:
    stats = planner.demands[0].stats
    assert stats is not None
    return sum(s.n for s in stats.per_llm.values())
