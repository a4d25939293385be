"""Allocation planning: workflows + GPUs + a goal → a plan, by a policy (the MILP or a baseline).

The planning problem
    Workflows w, each with request graphs (traced, or sampled from its program), statistics and
    a rate λ_w. Their LLMs map onto deployments d: one per LLM of a single workflow; across
    workflows, LLMs that name the same catalog model share one deployment (its load is the sum,
    its profile is measured on the combined call mix).

Goals (`mode`)
    target        lowest predicted latency (Σ_w of each workflow's mean) at the target rates
    max-throughput the largest common scale θ of the rates any allocation carries (one MILP,
                  milp.solve_max_rate), then the lowest latency at θ·(1 − throughput_tol)·max_util:
                  among the allocations whose predicted capacity is within throughput_tol (3%)
                  of the most — a tie the predictor cannot break (its capacity errs by a median
                  2.9%, worst 9.2%, in scripts/bench_predict.py) — the fastest
    slo           the largest θ whose lowest-latency plan meets the latency SLO in every
                  workflow (bisection over θ; each step is a target-mode plan)

`milp` in target mode iterates: costs come from critical paths (candidates.PathWeights); the
first paths are those of the unloaded requests; after each solve the chosen allocation is
evaluated by the full alp-cp predictor, whose critical paths re-weight the costs; it stops when
an allocation repeats and keeps the one alp-cp ranks best.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

from scepsy_hpc.allocate import candidates as cand
from scepsy_hpc.allocate.milp import (Candidate, MILPResult, choice_key, instance_bound, mixed_candidate,
                                      shared_gpus_needed, solve, solve_counts, solve_max_rate)
from scepsy_hpc.errors import InfeasibleError, SpecError
from scepsy_hpc.predict.alp import Prediction, pooled_point, predict_cp, predict_paper
from scepsy_hpc.predict.inputs import ProfileSource, prefetch, program_graphs
from scepsy_hpc.predict.pool import Held, pool_point, pool_profile
from scepsy_hpc.profile.table import ProfileTable
from scepsy_hpc.spec.catalog import GPUSpec, ModelSpec
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import Workflow, resolve_model
from scepsy_hpc.trace.graph import RequestGraph
from scepsy_hpc.trace.stats import WorkflowStats, aggregate

MODES = ("target", "max-throughput", "slo")
MAX_ITERATIONS = 4


@dataclass
class Demand:
    """One workflow to serve: spec, rate weight (its target rate), and what the predictor needs."""

    wf: Workflow
    weight_rps: float
    mix: dict[str, list[tuple[int, int]]]
    seqs: list[Any] | None = None            # sampled program requests (None with a trace)
    graphs: list[RequestGraph] = field(default_factory=list)   # traced graphs (or built from seqs)
    stats: WorkflowStats | None = None


@dataclass
class Deployment:
    """One served model: the (workflow index, LLM) pairs it serves, its model, its configurations."""

    name: str
    model: ModelSpec
    members: list[tuple[int, str]]
    configs: list[cand.Config] = field(default_factory=list)
    calls: float = 0.0       # calls per request-scale unit: Σ_w weight_w · n_w,llm


@dataclass(frozen=True)
class Outcome:
    """A policy's allocation and what the predictor says of it (a value: changed by `dataclasses.replace`)."""

    choice: dict[str, Candidate]
    rates: dict[str, float]
    predictions: dict[str, Prediction]
    status: str
    solve_time_s: float = 0.0
    iterations: int = 0
    candidates: int = 0
    notes: tuple[str, ...] = ()
    milp: MILPResult | None = None
    theta: float = 1.0                                   # the rate scale planned for
    priced: dict[str, list[Candidate]] | None = None     # milp: the candidates its MILP chose from
    checked: tuple[Any, ...] = ()                        # planning.simcheck.Checked rows of the simulator check
    check_time_s: float = 0.0
    top_choice: dict[str, Candidate] | None = None       # max-throughput milp: the allocation of the most predicted
                                                         # capacity, which the plan was picked within throughput_tol of

    @property
    def latency_s(self) -> float:
        """Σ over the workflows of the predicted mean latency."""
        return sum(p.latency_s for p in self.predictions.values())

    def noted(self, *notes: str) -> "Outcome":
        """This outcome with `notes` appended."""
        return replace(self, notes=(*self.notes, *notes))


PROFILE_CALLS = 16_000        # simulated calls per synthetic profile point, summed over the deployments
PROFILE_CALLS_PER_LLM = (500, 2_000)   # ... and the fewest and most one deployment's points get


def profile_calls(n_deployments: int) -> int:
    """Calls per point of each synthetic profile: 2,000 for up to 8 deployments; for more, the budget
    `PROFILE_CALLS` shared among them (never under 500), so that synthesising every profile of a
    large workflow costs about what 8 LLMs cost. Measured at 32 LLMs × 1,024 GPUs
    (scripts/bench_plan_scale.py --calls): 500 calls per point predict the plan's steady-state
    latency as well as 2,000 (0.971 vs 0.977 of the simulation) in a quarter of the time."""
    lo, hi = PROFILE_CALLS_PER_LLM
    return max(lo, min(hi, PROFILE_CALLS // max(n_deployments, 1)))


class Planner:
    """Plans for `demands` on `n_gpus` GPUs of type `gpu_name` (see the module docstring)."""

    def __init__(self, demands: Sequence[Demand], models: Mapping[str, ModelSpec], gpus: Mapping[str, GPUSpec],
                 gpu_name: str, n_gpus: int, *, max_tp: int = 8, fractions: Sequence[float] = cand.FRACTIONS,
                 max_util: float = 0.9, throughput_tol: float = 0.03, profiles_dir: str | None = None,
                 seed: int = 0, n_calls: int | None = None,
                 time_limit_s: float = 30.0, gap: float = 1e-6, eps: float = 1e-3,
                 progress: Callable[[str], None] | None = None, mixed_groups: bool = True) -> None:
        if gpu_name not in gpus:
            raise SpecError(f"unknown GPU type {gpu_name!r}; the catalog has {', '.join(sorted(gpus))}")
        if n_gpus < 1:
            raise SpecError(f"--gpus {n_gpus}: plan for at least one GPU")
        if not 0.1 <= max_util <= 1.0:
            raise SpecError(f"--max-util {max_util:g}: the utilisation cap must lie in [0.1, 1]")
        if not 0.0 <= throughput_tol < 0.5:
            raise SpecError(f"--throughput-tol {throughput_tol:g}: give a fraction in [0, 0.5), e.g. 0.03")
        # copies: the planner completes each demand's graphs and statistics without touching the caller's
        self.demands = [replace(dm, graphs=list(dm.graphs)) for dm in demands]
        self.models, self.gpus, self.gpu_name, self.n_gpus = models, gpus, gpu_name, n_gpus
        self.max_tp, self.fractions, self.max_util = max_tp, tuple(fractions), max_util
        self.throughput_tol = throughput_tol
        self.mixed_groups = mixed_groups   # max-throughput may serve an LLM by unlike replicas (policies)
        self.time_limit_s, self.gap, self.eps = time_limit_s, gap, eps
        # K_t of MILP constraint (6): tp-t groups the NVLink domains hold; set from a topology
        self.domain_caps: dict[int, int] = {}
        self.progress = progress or (lambda _msg: None)
        self.deployments = self._deployments()
        self.dep_of = {(i, llm): d.name for d in self.deployments.values() for i, llm in d.members}
        self.n_calls = n_calls if n_calls is not None else profile_calls(len(self.deployments))
        self._sources = {d.name: self._source(d, profiles_dir, seed, self.n_calls) for d in self.deployments.values()}
        self._prefetch()
        for d in self.deployments.values():
            d.configs = self._configs(d)
        self._finish_demands()

    def with_budget(self, *, n_gpus: int | None = None, domain_caps: Mapping[int, int] | None = None) -> "Planner":
        """A planner over the same demands and profiles for `n_gpus` GPUs and/or NVLink-domain caps
        `domain_caps` (constraint (6)); this one is left as it is. The profiles are shared: they do
        not depend on the budget."""
        if n_gpus is not None and n_gpus < 1:
            raise SpecError(f"--gpus {n_gpus}: plan for at least one GPU")
        out = copy.copy(self)
        out.n_gpus = self.n_gpus if n_gpus is None else n_gpus
        out.domain_caps = dict(self.domain_caps if domain_caps is None else domain_caps)
        return out

    def derated(self, factors: Mapping[str, float]) -> "Planner":
        """A planner whose MILPs provision deployment d for `factors[d]` (≥ 1) times its calls: as if its
        capacity were that many times less than its profiles say (planning.simcheck's repair, where the
        simulator found it short). Predictions (`evaluate`) are this planner's; this one is left as it is."""
        bad = {n: f for n, f in factors.items() if n not in self.deployments or not f >= 1.0}
        if bad:
            raise ValueError(f"derating factors {bad}: each must name a deployment and be >= 1")
        out = copy.copy(self)
        out.deployments = {n: replace(d, calls=d.calls * factors.get(n, 1.0)) for n, d in self.deployments.items()}
        return out

    # ---- setup -------------------------------------------------------------------------------

    def _deployments(self) -> dict[str, Deployment]:
        by_key: dict[Any, Deployment] = {}
        single = len(self.demands) == 1
        for i, dm in enumerate(self.demands):
            for llm, spec in dm.wf.llms.items():
                model = resolve_model(dm.wf, llm, self.models)
                key = llm if single else (spec.model if isinstance(spec.model, str) else f"{dm.wf.name}.{llm}")
                d = by_key.get(key)
                if d is None:
                    d = by_key[key] = Deployment(str(key), model, [])
                d.members.append((i, llm))
        # A deployment keeps its LLMs' name when they agree and no other deployment claims it;
        # otherwise it is named by its catalog model (or workflow.llm for an inline model).
        claims: dict[str, int] = {}
        for d in by_key.values():
            for llm in {x for _, x in d.members}:
                claims[llm] = claims.get(llm, 0) + 1
        out = {}
        for d in by_key.values():
            names = {llm for _, llm in d.members}
            if len(names) == 1 and claims[next(iter(names))] == 1:
                d.name = next(iter(names))
            out[d.name] = d
        return out

    def _source(self, d: Deployment, profiles_dir: str | None, seed: int, n_calls: int) -> tuple[ProfileSource, str]:
        i, llm = d.members[0]
        mix: list[tuple[int, int]] = []
        if len(d.members) == 1:
            mix = list(self.demands[i].mix.get(llm, []))
        else:  # the combined mix, each workflow's calls in proportion to the calls/s it sends
            shares = [(self.demands[j].mix.get(m, []), self.demands[j].weight_rps * len(self.demands[j].mix.get(m, [])))
                      for j, m in d.members]
            total = sum(s for _, s in shares) or 1.0
            for calls, s in shares:
                k = max(1, round(2000 * s / total)) if calls else 0
                mix.extend(calls[(q * len(calls)) // k] for q in range(k))
        src = ProfileSource(self.demands[i].wf, self.models, self.gpus, {llm: mix}, profiles_dir, seed=seed, n_calls=n_calls)
        return src, llm

    @property
    def sources(self) -> dict[str, tuple[ProfileSource, str]]:
        """Per deployment, where its profiles come from and the LLM they are made for."""
        return self._sources

    def profile(self, dep: str, tp: int, frac: float) -> ProfileTable:
        """The profile of deployment `dep` at (tp, frac) on the planning GPU type."""
        src, llm = self._sources[dep]
        return src.get(llm, LLMAlloc(tp=tp, gpu_frac=frac), self.gpu_name)

    def profile_of(self, dep: str, c: Candidate) -> ProfileTable:
        """The profile `evaluate` prices candidate `c` of `dep` with: its configuration's, or for a mixed group
        the equivalent replica of its pool (predict.pool), routed by the configurations' profile capacities
        (what the plan writes as `capacity_rps`, so the gateway routes by the same weights)."""
        if not c.more:
            return self.profile(dep, c.tp, c.gpu_frac)
        key = (dep, tuple((g.tp, g.gpu_frac, g.replicas) for g in c.groups))
        pools = self.__dict__.setdefault("_pools", {})
        if key not in pools:
            tables = [self.profile(dep, g.tp, g.gpu_frac) for g in c.groups]
            pools[key] = pool_profile([(t, g.replicas) for t, g in zip(tables, c.groups)], [t.capacity_rps for t in tables])
        return pools[key]

    def _prefetch(self) -> None:
        """Synthesise every deployment's profiles side by side (predict.inputs.prefetch: the same
        profiles, made in processes; 32 LLMs × their configurations is minutes one by one)."""
        gpu = self.gpus[self.gpu_name]
        wanted = []
        for d in self.deployments.values():
            src, llm = self._sources[d.name]
            if any(self.demands[i].mix.get(m) for i, m in d.members):
                wanted += [(src, llm, LLMAlloc(tp=tp, gpu_frac=f))
                           for tp, f in cand.fitting_configs(d.model, gpu, self.max_tp, self.fractions)]
        if wanted:
            self.progress(f"profile {len(wanted)} configurations")
            prefetch(wanted, self.gpu_name)

    def _configs(self, d: Deployment) -> list[cand.Config]:
        gpu = self.gpus[self.gpu_name]
        pairs = cand.fitting_configs(d.model, gpu, self.max_tp, self.fractions)
        if not pairs:
            raise InfeasibleError(cand.no_fit_message(f"LLM {d.name!r} ({d.model.hf_id})", d.model, self.gpu_name, gpu, self.max_tp))
        if not any(self.demands[i].mix.get(llm) for i, llm in d.members):
            return [cand.Config(tp, f, None) for tp, f in pairs[:1]]  # type: ignore[arg-type]
        out, missing = [], []
        measured_only = self._sources[d.name][0].profiles_dir is not None
        for tp, f in pairs:
            self.progress(f"profile {d.name} tp={tp} gpu_frac={f:g}")
            try:
                out.append(cand.Config(tp, f, self.profile(d.name, tp, f)))
            except SpecError as exc:
                # with measured profiles, what was not measured is not a candidate (unless nothing was)
                if not measured_only or "no profile of" not in str(exc):
                    raise
                missing.append(exc)
        if not out:
            raise missing[0]
        return out

    def _finish_demands(self) -> None:
        for i, dm in enumerate(self.demands):
            graphs = dm.graphs
            if dm.seqs is not None and not graphs:
                ref = {llm: self.deployments[self.dep_of[i, llm]].configs[0].profile for llm in dm.wf.llms
                       if self.deployments[self.dep_of[i, llm]].configs[0].profile is not None}
                graphs = program_graphs(dm.seqs, ref)
            graphs = [g for g in graphs if g.ok]
            self.demands[i] = replace(dm, graphs=graphs, stats=aggregate(graphs, dm.wf.name))
        for d in self.deployments.values():
            d.calls = sum(self.demands[i].weight_rps * self._n(i, llm) for i, llm in d.members)

    def _n(self, i: int, llm: str) -> float:
        s = self.demands[i].stats.per_llm.get(llm)  # type: ignore[union-attr]
        return s.n if s is not None and s.calls else 0.0

    # ---- evaluation --------------------------------------------------------------------------

    def loads(self, theta: float) -> dict[str, float]:
        """Calls/s per deployment at rate scale θ (workflow w at θ·weight_w)."""
        return {name: theta * d.calls for name, d in self.deployments.items()}

    def rates(self, theta: float) -> dict[str, float]:
        """Requests/s per workflow at rate scale θ."""
        return {dm.wf.name: theta * dm.weight_rps for dm in self.demands}

    def evaluate(self, choice: Mapping[str, Candidate], theta: float, predictor: str = "alp-cp",
                 keep_paths: bool = False) -> dict[str, Prediction]:
        """Each workflow's prediction under `choice` (deployment → candidate) at rate scale θ."""
        out = {}
        for i, dm in enumerate(self.demands):
            rate = theta * dm.weight_rps
            profiles, replicas, extra = {}, {}, {}
            for llm in dm.wf.llms:
                if not self._n(i, llm):
                    continue
                dname = self.dep_of[i, llm]
                c = choice[dname]
                profiles[llm] = self.profile_of(dname, c)
                replicas[llm] = c.total_replicas
                extra[llm] = sum(theta * self.demands[j].weight_rps * self._n(j, m)
                                 for j, m in self.deployments[dname].members if j != i)
            assert dm.stats is not None
            if predictor == "alp-paper":
                out[dm.wf.name] = predict_paper(dm.stats, profiles, replicas, rate, extra)
            else:
                out[dm.wf.name] = predict_cp(dm.graphs, profiles, replicas, rate, dm.stats, extra, keep_paths)
        return out

    def throughput_scale(self, preds: Mapping[str, Prediction]) -> float:
        """The rate scale θ at which the first deployment saturates, from per-LLM capacities."""
        theta = math.inf
        for d in self.deployments.values():
            if d.calls <= 0:
                continue
            i, llm = d.members[0]
            p = preds[self.demands[i].wf.name].per_llm.get(llm)
            if p is not None:
                theta = min(theta, p.capacity_rps / d.calls)
        return theta

    def fits(self, choice: Mapping[str, Candidate]) -> bool:
        """`choice` packs onto the GPUs (MILP constraints (3), (4)) within the NVLink domain caps (6)."""
        if used_gpus(choice) > self.n_gpus:
            return False
        return all(sum(c.tp_groups(t) for c in choice.values()) <= cap for t, cap in self.domain_caps.items())

    def outcome(self, choice: dict[str, Candidate], theta: float, status: str, **kw: Any) -> Outcome:
        """An Outcome for `choice` at scale θ; `status` becomes "under-capacity" if it cannot carry θ."""
        preds = self.evaluate(choice, theta)
        if any(p.saturated or not math.isfinite(p.latency_s) for p in preds.values()):
            status = "under-capacity"
        kw.setdefault("theta", theta)
        return Outcome(choice, self.rates(theta), preds, status, **kw)

    # ---- the MILP policy ---------------------------------------------------------------------

    def _weights(self, paths: Mapping[int, Sequence[Sequence[int]] | None]) -> dict[str, dict[tuple[int, str], cand.PathWeights]]:
        per: dict[str, dict[tuple[int, str], cand.PathWeights]] = {d: {} for d in self.deployments}
        for i, dm in enumerate(self.demands):
            ws = cand.path_weights(dm.graphs, paths.get(i), dm.wf.llms)
            for llm, w in ws.items():
                per[self.dep_of[i, llm]][i, llm] = w
        return per

    def latency_candidates(self, theta: float, paths: Mapping[int, Sequence[Sequence[int]] | None],
                           max_util: float | None = None) -> dict[str, list[Candidate]]:
        """Per deployment, the candidates that carry scale θ at utilisation ≤ `max_util` (default:
        the planner's cap) priced along `paths`."""
        cap = self.max_util if max_util is None else max_util
        weights = self._weights(paths)
        loads = self.loads(theta)
        # GPUs each deployment can have at most: the budget less the others' smallest shares (whole
        # GPUs, rounded down), so no candidate that cannot fit beside the others is priced
        least = {name: self._least_share(d, loads[name], cap) for name, d in self.deployments.items()}
        total = sum(math.floor(v + 1e-9) for v in least.values())
        out = {}
        for name, d in self.deployments.items():
            if d.calls <= 0:
                c = d.configs[0]
                out[name] = [Candidate(self.gpu_name, c.tp, c.gpu_frac, 1, 0.0, 0.0)]
                continue
            room = self.n_gpus - (total - math.floor(least[name] + 1e-9))
            cost = cand.weights_cost(weights[name])
            singles = cand.latency_candidates(self.gpu_name, d.configs, loads[name], max(room, 0), cap, cost, self.eps)
            mixed = self._mixed_candidates(name, d, singles, loads[name], max(room, 0), cap, cost) if self.mixed_groups else []
            out[name] = cand.pareto(singles + mixed, lambda c: c.cost_s, self.eps, cand.MIN_GAIN_S) if mixed else singles
        return out

    def _mixed_candidates(self, name: str, d: Deployment, singles: Sequence[Candidate], load: float, room: int,
                          cap: float, cost: Callable[[Any, int, bool], float]) -> list[Candidate]:
        """Mixed groups for the latency MILP: each one-configuration candidate, and the same with one replica
        fewer, plus one replica of a smaller configuration — capacity and GPUs in finer steps than whole
        replicas of one size — kept when it carries `load` at `cap` within `room` GPUs, priced by the
        pool's per-call model at that load (predict.pool.pool_point: the split the routing makes)."""
        configs = {(c.tp, c.gpu_frac): c for c in d.configs if c.profile is not None and c.profile.capacity_rps > 0}
        held = self.__dict__.setdefault("_held", {})
        points = self.__dict__.setdefault("_pool_points", {})
        out = []
        bases = {(s.tp, s.gpu_frac, r) for s in singles if not s.more for r in (s.replicas, s.replicas - 1) if r >= 1}
        for tp, frac, r1 in sorted(bases):
            c1 = configs.get((tp, frac))
            if c1 is None:
                continue
            for c2 in configs.values():
                if c2.gpus >= c1.gpus:
                    continue
                mu1, mu2 = c1.profile.capacity_rps, c2.profile.capacity_rps
                if load > cap * (r1 * mu1 + mu2):
                    continue
                i1 = Candidate(self.gpu_name, c1.tp, c1.gpu_frac, 1, 0.0, mu1)
                i2 = Candidate(self.gpu_name, c2.tp, c2.gpu_frac, 1, 0.0, mu2)
                probe = mixed_candidate({i1: r1, i2: 1})
                if used_gpus({name: probe}) > room:
                    continue
                pk = (name, c1.tp, c1.gpu_frac, r1, c2.tp, c2.gpu_frac, load)
                if pk not in points:   # the pool's model at this load: the same in every critical-path round
                    curves = []
                    for c in (c1, c2):
                        h = held.get((name, c.tp, c.gpu_frac))
                        if h is None:
                            h = held[name, c.tp, c.gpu_frac] = Held(c.profile)
                        curves.append(h)
                    points[pk] = pool_point([(c1.profile, r1), (c2.profile, 1)], [mu1, mu2], load, curves)
                p = points[pk]
                if p is None:
                    continue
                out.append(replace(probe, cost_s=cost(p, r1 + 1, c1.profile.arrivals == "requests")))
        return out

    def _least_share(self, d: Deployment, load: float, cap: float) -> float:
        """The smallest GPU share (tp·r·f) of any candidate of `d` carrying `load` at utilisation ≤ `cap`."""
        if d.calls <= 0:
            return d.configs[0].gpus
        shares = [c.gpus * max(1, math.ceil(load / (c.profile.capacity_rps * cap) - 1e-9))
                  for c in d.configs if c.profile is not None and c.profile.capacity_rps > 0]
        return min(shares, default=0.0)

    def milp_latency(self, theta: float) -> Outcome:
        """Lowest predicted latency at scale θ (target mode), iterating the critical paths."""
        paths: dict[int, Sequence[Sequence[int]] | None] = {i: None for i in range(len(self.demands))}
        best: Outcome | None = None
        seen: set[tuple[Any, ...]] = set()
        solve_time, n_cands = 0.0, 0
        for it in range(1, MAX_ITERATIONS + 1):
            cands = self.latency_candidates(theta, paths)
            n_cands = sum(len(c) for c in cands.values())
            try:
                res = solve(cand.prune_by_bound(cands, self.n_gpus, self.fits), {self.gpu_name: self.n_gpus},
                            time_limit_s=self.time_limit_s, gap=self.gap, domain_caps=self.domain_caps)
            except InfeasibleError:
                raise self.infeasible(theta) from None
            solve_time += res.solve_time_s
            key = choice_key(res.choice)
            if key in seen:
                break
            seen.add(key)
            preds = self.evaluate(res.choice, theta, keep_paths=True)
            out = Outcome(dict(res.choice), self.rates(theta), preds, res.status, solve_time, it, n_cands, milp=res,
                          theta=theta, priced=cands)
            if best is None or out.latency_s < best.latency_s - 1e-9:
                best = out
            paths = {i: preds[dm.wf.name].paths for i, dm in enumerate(self.demands)}
        assert best is not None
        best = replace(best, solve_time_s=solve_time, iterations=it)
        if best.milp is not None and best.milp.time_limit_hit:
            best = best.noted(f"HiGHS stopped at its time limit ({self.time_limit_s:g} s) with a feasible, "
                              f"not proven optimal, allocation")
        if any(p.saturated for p in best.predictions.values()):
            best = replace(best, status="under-capacity")
        return best

    def max_scale(self) -> tuple[float, MILPResult]:
        """The largest rate scale θ the GPUs carry at full utilisation (exact, one MILP)."""
        cands = {name: (cand.capacity_candidates(self.gpu_name, d.configs, self.n_gpus, self.eps) if d.calls > 0 else
                        [Candidate(self.gpu_name, d.configs[0].tp, d.configs[0].gpu_frac, 1, 0.0, 0.0)])
                 for name, d in self.deployments.items()}
        theta, res = solve_max_rate(cands, {self.gpu_name: self.n_gpus}, {n: d.calls for n, d in self.deployments.items()},
                                    time_limit_s=self.time_limit_s, gap=self.gap, domain_caps=self.domain_caps)
        return theta, res

    def instances(self) -> dict[str, list[Candidate]]:
        """Per deployment with load, its configurations as single instances (capacity μ, no cost)."""
        return {n: [Candidate(self.gpu_name, c.tp, c.gpu_frac, 1, 0.0, c.profile.capacity_rps)
                    for c in d.configs if c.profile is not None and c.profile.capacity_rps > 0]
                for n, d in self.deployments.items() if d.calls > 0}

    def instance_scale(self) -> tuple[float, dict[str, dict[Candidate, int]]]:
        """The largest rate scale θ any set of whole instances carries, configurations of one LLM mixed
        (milp.instance_bound: exact over every allocation the plan format expresses), and its counts."""
        return instance_bound(self.instances(), {self.gpu_name: self.n_gpus},
                              {n: d.calls for n, d in self.deployments.items() if d.calls > 0},
                              time_limit_s=self.time_limit_s, domain_caps=self.domain_caps)

    def instance_choice(self, counts: Mapping[str, Mapping[Candidate, int]]) -> dict[str, Candidate]:
        """The allocation of `instance_scale`'s counts: each LLM's instances as one (mixed) candidate, a
        deployment without calls at its first configuration."""
        out = {n: mixed_candidate(k) for n, k in counts.items() if any(v > 0 for v in k.values())}
        for name, d in self.deployments.items():
            if name not in out:
                c0 = d.configs[0]
                out[name] = Candidate(self.gpu_name, c0.tp, c0.gpu_frac, 1, 0.0, 0.0)
        return out

    def milp_mixed(self, theta: float) -> Outcome:
        """The mixed groups that carry scale θ (every LLM at ≤ `max_util` of its pool's capacity) at the least
        capacity-weighted critical-path cost: an instance of configuration c costs μ_c·ℓ_c / (n·θ), ℓ_c the
        critical-path seconds per request of the LLM's calls served by c at `max_util` of its capacity and
        n·θ the calls/s it must carry, so Σ_c x_c·μ_c·ℓ_c / (n·θ) is the LLM's critical path when calls
        share the pool by capacity (milp.solve_counts). The allocation is then priced by alp-cp."""
        weights = self._weights({i: None for i in range(len(self.demands))})
        insts = {}
        for name, cs in self.instances().items():
            d = self.deployments[name]
            cost = cand.weights_cost(weights[name])
            priced = []
            for c in cs:
                table = self.profile(name, c.tp, c.gpu_frac)
                p = pooled_point(table, self.max_util * table.capacity_rps, 1)
                ell = cost(p, 1, table.arrivals == "requests") if p is not None else math.inf
                priced.append(replace(c, cost_s=c.capacity_rps * ell / (d.calls * theta)) if math.isfinite(ell) else c)
            insts[name] = priced
        calls = {n: d.calls / self.max_util for n, d in self.deployments.items() if d.calls > 0}
        choice, res = solve_counts(insts, {self.gpu_name: self.n_gpus}, calls, theta, time_limit_s=self.time_limit_s,
                                   gap=self.gap, domain_caps=self.domain_caps)
        for name, d in self.deployments.items():
            if d.calls <= 0:
                c0 = d.configs[0]
                choice[name] = Candidate(self.gpu_name, c0.tp, c0.gpu_frac, 1, 0.0, 0.0)
        out = self.outcome(choice, theta, res.status, solve_time_s=res.solve_time_s, iterations=1,
                           candidates=sum(len(v) for v in insts.values()))
        if res.time_limit_hit:
            out = out.noted(f"HiGHS stopped at its time limit ({self.time_limit_s:g} s) with a feasible, "
                            f"not proven optimal, allocation")
        return out

    def infeasible(self, theta: float) -> InfeasibleError:
        """What is missing for scale θ: GPUs needed, GPUs given, the rate that fits."""
        rates = ", ".join(f"{w} {r:g} rps" for w, r in self.rates(theta).items())
        try:
            top, _ = self.max_scale()
        except InfeasibleError:
            smallest = {n: d.configs[0] for n, d in self.deployments.items()}
            fit = used_gpus({n: Candidate(self.gpu_name, c.tp, c.gpu_frac, 1, 0.0) for n, c in smallest.items()})
            each = ", ".join(f"{n} {'tp=' + str(c.tp) if c.gpu_frac >= 1 else 'gpu_frac=' + format(c.gpu_frac, 'g')}"
                             for n, c in smallest.items())
            return InfeasibleError(f"{rates}: the LLMs do not fit on {self.n_gpus} {self.gpu_name} even with one replica each: "
                                   f"their smallest memory-fitting instances ({each}) take {fit} GPUs; raise --gpus")
        need = self.gpus_needed(theta)
        fits = ", ".join(f"{w} {r:.3g} rps" for w, r in self.rates(top * self.max_util).items())
        need_s = f"needs {need} GPUs" if need is not None else "needs more GPUs than any configuration list allows"
        return InfeasibleError(f"{rates}: {need_s} at ≤{self.max_util:.0%} utilisation; {self.n_gpus} {self.gpu_name} given; "
                               f"at most {fits} fits (raise --gpus, lower the target, or raise --max-util)")

    def gpus_needed(self, theta: float) -> int | None:
        """The fewest GPUs that carry scale θ at the utilisation cap (a MILP minimising GPUs)."""
        budget = max(self.n_gpus, 1) * 64
        loads = self.loads(theta)
        cands = {}
        for name, d in self.deployments.items():
            cs = cand.latency_candidates(self.gpu_name, d.configs, loads[name], budget, self.max_util,
                                         lambda p, r, s: 0.0, eps=math.inf) if d.calls > 0 else []
            fewest = [Candidate(c.gpu, c.tp, c.gpu_frac, c.replicas, c.gpus, c.capacity_rps) for c in cs]
            if d.calls <= 0:
                c0 = d.configs[0]
                fewest = [Candidate(self.gpu_name, c0.tp, c0.gpu_frac, 1, c0.gpus, 0.0)]
            cands[name] = fewest
        try:
            res = solve(cands, {self.gpu_name: budget}, time_limit_s=self.time_limit_s)
        except InfeasibleError:
            return None
        return res.gpus_used()[self.gpu_name]


def used_gpus(choice: Mapping[str, Candidate]) -> int:
    """Whole GPUs plus the fewest shared GPUs that pack the fractions."""
    return sum(c.whole_gpus for c in choice.values()) + sum(shared_gpus_needed(choice).values())
