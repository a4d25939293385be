"""The allocation MILP (DESIGN.md §4), solved with PuLP and HiGHS.

Sets
    M              LLM deployments
    C_m            candidate configurations of m: c = (g, tp, f, r) — GPU type g, tensor parallelism
                   tp, GPU fraction f (f < 1 only at tp = 1, on the quarter grid), r replicas
    G              GPU types, with N_g GPUs available

Parameters
    ℓ_mc           latency cost of m under c at the target rate (seconds; from the predictor)
    w_mc           whole GPUs c takes: tp·r if f = 1, else 0
    q_mck          fractional instances of size k/4 that c brings: r if f = k/4 < 1, else 0

Variables
    x_mc ∈ {0,1}   m runs configuration c
    s_g ∈ ℤ≥0      GPUs of type g shared by fractional instances

Objective (latency mode, `solve`)
    minimise Σ_m Σ_c ℓ_mc·x_mc

Constraints
    (1) Σ_c x_mc = 1                                         ∀ m            every LLM is served once
    (2) Σ_m Σ_{c: g} w_mc·x_mc + s_g ≤ N_g                   ∀ g            whole and shared GPUs fit
    (3) 4·s_g ≥ Σ_m Σ_{c: g} (3·q_mc3 + 2·q_mc2 + q_mc1)·x_mc  ∀ g          shared GPUs hold the quarters
    (4) s_g ≥ Σ_m Σ_{c: g} (q_mc3 + q_mc2 / 2)·x_mc           ∀ g            a 3/4 never shares with a 1/2,
                                                                           two halves fill a GPU
    (6) Σ_m Σ_{c: tp_c ≥ t} (tp_c / t)·r_c·x_mc ≤ K_t        ∀ t ∈ T        tensor-parallel groups fit
                                                                           the NVLink domains
    (7) Σ_m Σ_{c: |γ_c − γ*_km| < δ} x_mc ≤ |M| − 1          ∀ k ∈ X        (alternatives only) some LLM's
                                                                           GPU share moves by ≥ δ from
                                                                           each excluded split k
where K_t = Σ_d ⌊|d| / t⌋ counts the disjoint groups of t GPUs the NVLink domains d of the cluster
hold (given by placement, `domain_caps`; absent when the GPUs are not described). With power-of-two
tp and domain sizes, (2) and (6) make every solution placeable; a placement that still fails lowers
K_t to what it could place and the planner solves again.
Constraint (7), with γ_c = tp·r·f the GPU share of c and γ*_k the shares of an earlier solution k,
yields the next-best allocation that splits the GPUs differently (`solve(..., exclude=...)`): the
planner's simulator check asks for a few such alternatives (planning.simcheck.shortlist).
With s_g integral, (3) and (4) give exactly the fewest GPUs that pack the quarter-sized instances
(each 3/4 takes a GPU, perhaps with one 1/4; halves pair; quarters fill the gaps), so every
solution packs onto whole GPUs. Capacity needs no constraint: candidates that cannot carry their
load with headroom are never generated.

Throughput mode (`solve_max_rate`): with κ_mc the calls/s candidate c completes (r·μ) and n_m the
calls LLM m receives per unit of the rate scale θ (Σ over the workflows it serves of n_wm·λ_w),
    maximise θ  subject to (1)–(4) and
    (5) Σ_c κ_mc·x_mc ≥ n_m·θ                               ∀ m            every LLM carries its load
so the rate scale the GPUs can carry is found exactly, in one solve, not by bisection.

Instance bound (`instance_bound`): the same problem with replicas of *different* configurations
allowed for one LLM — an upper bound on every allocation the plan format can express, and a
tighter one than the fluid bound (GPUs divisible at will), since instances stay whole. Candidates
are single instances (r = 1, κ_mc = μ_c) and x_mc ∈ ℤ≥0 counts them:
    maximise θ  subject to (2)–(5) and
    (1') Σ_c x_mc ≥ 1                                        ∀ m            every LLM is served
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from scepsy_hpc.errors import InfeasibleError, SolverError
from scepsy_hpc.allocate.solver import solve_highs
from scepsy_hpc.spec.fractions import LARGE_SHARE, SLOTS, quarter, quarter_gpus


@dataclass(frozen=True)
class Candidate:
    """One configuration c of one LLM m and its latency cost ℓ_mc.

    A mixed candidate (a mixed group) adds replicas of other configurations in `more` (each a
    Candidate of one configuration, cost 0); `tp`, `gpu_frac`, `replicas` are then its first group's,
    `capacity_rps` the whole group's, and every count the MILP uses sums over the groups."""

    gpu: str
    tp: int
    gpu_frac: float
    replicas: int
    cost_s: float
    capacity_rps: float = 0.0   # κ_mc: calls/s all replicas complete
    more: tuple["Candidate", ...] = ()

    @property
    def groups(self) -> tuple["Candidate", ...]:
        """Its configurations, each with its replicas and the capacity they carry (one for a plain candidate):
        the first group's is the candidate's total less the others' (the plan's routing weights come from it)."""
        if not self.more:
            return (self,)
        own = max(self.capacity_rps - sum(g.capacity_rps for g in self.more), 0.0)
        return (replace(self, more=(), capacity_rps=own, cost_s=0.0), *self.more)

    @property
    def whole_gpus(self) -> int:
        """w_mc: whole GPUs this configuration takes."""
        own = self.tp * self.replicas if self.gpu_frac >= 1.0 else 0
        return own + sum(g.whole_gpus for g in self.more)

    @property
    def quarter(self) -> int:
        """k when this is r instances of size k/4 < 1, else 0 (a mixed candidate: its first group's)."""
        return quarter(self.gpu_frac)

    @property
    def kind(self) -> tuple[int, ...]:
        """The instance sizes it packs: the quarter sizes (0: whole GPUs) of its groups, sorted."""
        return tuple(sorted({g.quarter for g in self.groups}))

    def quarter_units(self) -> int:
        """Σ over its fractional instances of k (quarters of a GPU): the left side of constraint (3)."""
        return sum(g.quarter * g.replicas for g in self.groups if g.quarter)

    def large_units(self) -> float:
        """Σ over its 3/4 and 1/2 instances of 1 and 1/2: the left side of constraint (4)."""
        return sum(LARGE_SHARE[g.quarter] * g.replicas for g in self.groups if g.quarter in LARGE_SHARE)

    def tp_groups(self, t: int) -> int:
        """Disjoint groups of t GPUs its whole instances of tp ≥ t take (constraint (6))."""
        return sum((g.tp // t) * g.replicas for g in self.groups if g.gpu_frac >= 1.0 and g.tp >= t)

    @property
    def total_replicas(self) -> int:
        """Replicas of all its groups."""
        return sum(g.replicas for g in self.groups)

    @property
    def gpus(self) -> float:
        """GPU share in all: tp·r·f."""
        return self.tp * self.replicas * self.gpu_frac + sum(g.gpus for g in self.more)


@dataclass(frozen=True)
class MILPResult:
    """The chosen candidate per LLM, shared GPUs per type, objective, status and solve time."""

    choice: dict[str, Candidate]
    shared_gpus: dict[str, int]
    objective_s: float
    status: str
    solve_time_s: float
    variables: int
    time_limit_hit: bool = False

    def gpus_used(self) -> dict[str, int]:
        """Whole plus shared GPUs per type."""
        used = dict(self.shared_gpus)
        for c in self.choice.values():
            used[c.gpu] = used.get(c.gpu, 0) + c.whole_gpus
        return used


def _check_nonempty(candidates: Mapping[str, Sequence[Candidate]]) -> None:
    empty = [m for m, cs in candidates.items() if not cs]
    if empty:
        raise InfeasibleError(f"no configuration of LLM(s) {', '.join(empty)} fits in memory and carries its load; "
                              f"lower the target rate or allow more GPUs per instance")


def _model(candidates: Mapping[str, Sequence[Candidate]], budget: Mapping[str, int], sense: int,
           domain_caps: Mapping[int, int] | None = None, counts: bool = False) -> tuple[Any, dict, dict]:
    """The problem with variables x_mc, s_g and constraints (1)–(4), (6); the caller sets the objective.
    `counts`: x_mc counts instances (ℤ≥0, constraint (1')) instead of choosing one candidate."""
    import pulp

    prob = pulp.LpProblem("allocation", sense)
    x = {(m, i): prob.add_variable(f"x_{k}_{i}", lowBound=0, cat="Integer") if counts else
         prob.add_variable(f"x_{k}_{i}", cat="Binary")
         for k, (m, cs) in enumerate(candidates.items()) for i in range(len(cs))}
    types = sorted({c.gpu for cs in candidates.values() for c in cs})
    s = {g: prob.add_variable(f"s_{j}", lowBound=0, cat="Integer") for j, g in enumerate(types)}
    for k, (m, cs) in enumerate(candidates.items()):
        served = pulp.lpSum(x[m, i] for i in range(len(cs)))
        prob += (served >= 1 if counts else served == 1), f"c1_serve_{k}"
    for j, g in enumerate(types):
        on_g = [(m, i, c) for m, cs in candidates.items() for i, c in enumerate(cs) if c.gpu == g]
        prob += pulp.lpSum(c.whole_gpus * x[m, i] for m, i, c in on_g) + s[g] <= budget.get(g, 0), f"c2_gpus_{j}"
        prob += SLOTS * s[g] >= pulp.lpSum(c.quarter_units() * x[m, i] for m, i, c in on_g if c.quarter_units()), \
            f"c3_quarters_{j}"
        prob += s[g] >= pulp.lpSum(c.large_units() * x[m, i] for m, i, c in on_g if c.large_units()), f"c4_pairs_{j}"
    for t, cap in sorted((domain_caps or {}).items()):
        groups = [(c.tp_groups(t), m, i) for m, cs in candidates.items() for i, c in enumerate(cs) if c.tp_groups(t)]
        if groups:
            prob += pulp.lpSum(k * x[m, i] for k, m, i in groups) <= cap, f"c6_domains_{t}"
    return prob, x, s


def _run(prob: Any, time_limit_s: float, gap: float, msg: bool) -> tuple[str, bool]:
    """Solve; (status, whether optimality is proven). PuLP reports a solver stopped at its time
    limit with an incumbent as "Optimal" with an integer-feasible solution status; that is
    "feasible" here. Solver failures become SolverError; infeasibility and no solution are raised
    by the caller, which knows what to say."""
    import pulp

    solve_highs(prob, "allocation MILP", time_limit_s=time_limit_s, gap=gap, msg=msg)
    status = pulp.LpStatus[prob.status]
    if status == "Optimal":
        return ("optimal", True) if prob.sol_status == pulp.LpSolutionOptimal else ("feasible", False)
    return status, False


def _result(candidates: Mapping[str, Sequence[Candidate]], x: dict, s: dict, prob: Any, status: str,
            elapsed: float, time_limit_s: float) -> MILPResult:
    import pulp

    choice = {}
    for m, cs in candidates.items():
        picked = [c for i, c in enumerate(cs) if (x[m, i].value() or 0.0) > 0.5]
        if len(picked) != 1:
            raise SolverError(f"HiGHS returned {len(picked)} configurations for LLM {m!r}; expected exactly one")
        choice[m] = picked[0]
    shared = {g: int(round(v.value() or 0.0)) for g, v in s.items()}
    # "optimal" is proven within the gap; "feasible" is the incumbent when the time limit stopped HiGHS.
    return MILPResult(choice, shared, float(pulp.value(prob.objective)), status, elapsed, len(x) + len(s),
                      time_limit_hit=status == "feasible")


def _infeasible(candidates: Mapping[str, Sequence[Candidate]], budget: Mapping[str, int]) -> InfeasibleError:
    need = sum(min(c.gpus for c in cs) for cs in candidates.values())
    types = sorted({c.gpu for cs in candidates.values() for c in cs})
    have = sum(budget.get(g, 0) for g in types)
    return InfeasibleError(f"no allocation fits: the smallest configurations that carry the load need "
                           f"{need:g} GPUs in all; {have} given")


def _check_status(status: str, candidates: Mapping[str, Sequence[Candidate]], budget: Mapping[str, int],
                  elapsed: float, time_limit_s: float) -> None:
    """Raise InfeasibleError or SolverError unless HiGHS returned an integer solution."""
    if status == "Infeasible":
        raise _infeasible(candidates, budget)
    if status not in ("optimal", "feasible"):
        raise SolverError(f"HiGHS stopped with status {status!r} after {elapsed:.1f} s and no solution; "
                          f"raise the time limit ({time_limit_s:g} s)")


def solve(candidates: Mapping[str, Sequence[Candidate]], budget: Mapping[str, int], *,
          time_limit_s: float = 30.0, gap: float = 1e-6, msg: bool = False,
          domain_caps: Mapping[int, int] | None = None, exclude: Sequence[Mapping[str, float]] = (),
          delta: float = 1.0) -> MILPResult:
    """Pick one candidate per LLM minimising Σ ℓ within the GPU budget (see the module docstring).
    `exclude`: GPU shares per LLM of earlier solutions; constraint (7) moves some LLM's share by at
    least `delta` GPUs from each of them."""
    import pulp

    _check_nonempty(candidates)
    t0 = time.perf_counter()
    prob, x, s = _model(candidates, budget, pulp.LpMinimize, domain_caps)
    for k, shares in enumerate(exclude):
        near = [x[m, i] for m, cs in candidates.items() if m in shares
                for i, c in enumerate(cs) if abs(c.gpus - shares[m]) < delta - 1e-9]
        prob += pulp.lpSum(near) <= len(candidates) - 1, f"c7_other_split_{k}"
    prob += pulp.lpSum(c.cost_s * x[m, i] for m, cs in candidates.items() for i, c in enumerate(cs))
    status, _ = _run(prob, time_limit_s, gap, msg)
    elapsed = time.perf_counter() - t0
    _check_status(status, candidates, budget, elapsed, time_limit_s)
    return _result(candidates, x, s, prob, status, elapsed, time_limit_s)


def _max_theta(candidates: Mapping[str, Sequence[Candidate]], budget: Mapping[str, int],
               calls_per_unit: Mapping[str, float], time_limit_s: float, gap: float, msg: bool,
               domain_caps: Mapping[int, int] | None, counts: bool) -> tuple[float, Any, dict, dict, str, float]:
    """Maximise θ subject to (1)–(6), or (1')–(6) with `counts`; raise unless HiGHS found a solution."""
    import pulp

    _check_nonempty(candidates)
    t0 = time.perf_counter()
    prob, x, s = _model(candidates, budget, pulp.LpMaximize, domain_caps, counts)
    theta = prob.add_variable("theta", lowBound=0)
    prob += theta
    for k, (m, cs) in enumerate(candidates.items()):
        prob += pulp.lpSum(c.capacity_rps * x[m, i] for i, c in enumerate(cs)) >= calls_per_unit.get(m, 0.0) * theta, f"c5_carry_{k}"
    status, _ = _run(prob, time_limit_s, gap, msg)
    elapsed = time.perf_counter() - t0
    _check_status(status, candidates, budget, elapsed, time_limit_s)
    return float(theta.value() or 0.0), prob, x, s, status, elapsed


COMPACT_ABOVE = 5000   # candidates above which `solve_max_rate` solves the compact form (`_max_rate_compact`)


def solve_max_rate(candidates: Mapping[str, Sequence[Candidate]], budget: Mapping[str, int],
                   calls_per_unit: Mapping[str, float], *, time_limit_s: float = 30.0, gap: float = 1e-6,
                   msg: bool = False, domain_caps: Mapping[int, int] | None = None) -> tuple[float, MILPResult]:
    """The largest rate scale θ every LLM carries (constraint (5)) and the candidates that reach it. Above
    `COMPACT_ABOVE` candidates (every replica count of every configuration: 1,024 GPUs make ~10⁵, which
    HiGHS does not get through in minutes) the same problem in its compact form."""
    if (sum(len(cs) for cs in candidates.values()) > COMPACT_ABOVE
            and not any(c.more for cs in candidates.values() for c in cs)):
        return _max_rate_compact(candidates, budget, calls_per_unit, time_limit_s, gap, msg, domain_caps)
    theta, prob, x, s, status, elapsed = _max_theta(candidates, budget, calls_per_unit, time_limit_s, gap, msg,
                                                    domain_caps, counts=False)
    return theta, _result(candidates, x, s, prob, status, elapsed, time_limit_s)


def _max_rate_compact(candidates: Mapping[str, Sequence[Candidate]], budget: Mapping[str, int],
                      calls_per_unit: Mapping[str, float], time_limit_s: float, gap: float, msg: bool,
                      domain_caps: Mapping[int, int] | None) -> tuple[float, MILPResult]:
    """`solve_max_rate` with one variable per configuration instead of one per (configuration, replica
    count): the instance bound's model (x_mc ∈ ℤ≥0 counts single instances of configuration c) plus
    y_mc ∈ {0,1}, x_mc ≤ R_mc·y_mc and Σ_c y_mc ≤ 1 — one configuration per LLM, any count from 1 to the
    most its candidates have (R_mc). Every (c, r) candidate is such a solution and every solution is
    one of the candidates' configurations at a count they admit (a count pruned as dominated is still a
    valid allocation), so θ is the exact optimum over every count, from |configurations| variables, not
    |candidates|: the list form's θ, or more where its pruning dropped the count that reaches it (pruning by
    GPUs within a kind ignores the NVLink domain caps, constraint (6)). Among allocations of equal θ HiGHS
    may pick another than the list form would. The choice is the list's own candidate where it has that
    count. `variables` counts x, y, s and θ."""
    import pulp

    configs: dict[str, list[Candidate]] = {}
    most: dict[str, list[int]] = {}
    listed = {(m, c.gpu, c.tp, c.gpu_frac, c.replicas): c for m, cs in candidates.items() for c in cs}
    for m, cs in candidates.items():
        seen: dict[tuple[str, int, float], list[Any]] = {}
        for c in cs:
            k = (c.gpu, c.tp, c.gpu_frac)
            if k not in seen:
                seen[k] = [replace(c, replicas=1, capacity_rps=c.capacity_rps / c.replicas, cost_s=0.0), c.replicas]
            seen[k][1] = max(seen[k][1], c.replicas)
        configs[m] = [unit for unit, _ in seen.values()]
        most[m] = [r for _, r in seen.values()]
    _check_nonempty(configs)
    t0 = time.perf_counter()
    prob, x, s = _model(configs, budget, pulp.LpMaximize, domain_caps, counts=True)
    theta = prob.add_variable("theta", lowBound=0)
    prob += theta
    for k, (m, cs) in enumerate(configs.items()):
        y = [prob.add_variable(f"y_{k}_{i}", cat="Binary") for i in range(len(cs))]
        prob += pulp.lpSum(y) <= 1, f"c1_one_{k}"
        for i in range(len(cs)):
            prob += x[m, i] <= most[m][i] * y[i], f"c1_link_{k}_{i}"
        prob += pulp.lpSum(c.capacity_rps * x[m, i] for i, c in enumerate(cs)) >= calls_per_unit.get(m, 0.0) * theta, \
            f"c5_carry_{k}"
    status, _ = _run(prob, time_limit_s, gap, msg)
    elapsed = time.perf_counter() - t0
    _check_status(status, configs, budget, elapsed, time_limit_s)
    choice = {}
    for m, cs in configs.items():
        picked = [(c, int(round(x[m, i].value()))) for i, c in enumerate(cs) if (x[m, i].value() or 0.0) > 0.5]
        if len(picked) != 1:
            raise SolverError(f"HiGHS returned {len(picked)} configurations for LLM {m!r}; expected exactly one")
        c, r = picked[0]
        choice[m] = listed.get((m, c.gpu, c.tp, c.gpu_frac, r)) or replace(c, replicas=r, capacity_rps=c.capacity_rps * r)
    shared = {g: int(round(v.value() or 0.0)) for g, v in s.items()}
    value = float(theta.value() or 0.0)
    return value, MILPResult(choice, shared, value, status, elapsed, 2 * len(x) + len(s) + 1,
                             time_limit_hit=status == "feasible")


def instance_bound(instances: Mapping[str, Sequence[Candidate]], budget: Mapping[str, int],
                   calls_per_unit: Mapping[str, float], *, time_limit_s: float = 30.0, gap: float = 1e-6,
                   domain_caps: Mapping[int, int] | None = None) -> tuple[float, dict[str, dict[Candidate, int]]]:
    """The largest rate scale θ any set of whole instances carries within the budget, replicas of
    different configurations of one LLM allowed (the module docstring's instance bound); and the
    instance counts per LLM that reach it. `instances`: per LLM, its configurations as single
    instances (replicas = 1, capacity_rps = μ)."""
    if any(c.replicas != 1 for cs in instances.values() for c in cs):
        raise ValueError("instance_bound takes single instances (replicas = 1)")
    theta, _, x, _, _, _ = _max_theta(instances, budget, calls_per_unit, time_limit_s, gap, False, domain_caps,
                                      counts=True)
    counts = {m: {c: int(round(x[m, i].value() or 0.0)) for i, c in enumerate(cs) if (x[m, i].value() or 0.0) > 0.5}
              for m, cs in instances.items()}
    return theta, counts


def mixed_candidate(counts: Mapping[Candidate, int], cost_s: float = 0.0) -> Candidate:
    """One candidate of `counts` single instances per configuration (a mixed group when they differ):
    its first group is the configuration with the most capacity, `capacity_rps` the group's total."""
    parts = sorted(((c, k) for c, k in counts.items() if k > 0), key=lambda ck: (-ck[0].capacity_rps * ck[1], ck[0].gpus))
    if not parts:
        raise ValueError("a candidate needs at least one instance")
    groups = [replace(c, replicas=k, cost_s=0.0, capacity_rps=c.capacity_rps * k, more=()) for c, k in parts]
    total = sum(g.capacity_rps for g in groups)
    return replace(groups[0], cost_s=cost_s, capacity_rps=total, more=tuple(groups[1:]))


def solve_counts(instances: Mapping[str, Sequence[Candidate]], budget: Mapping[str, int],
                 calls_per_unit: Mapping[str, float], theta: float, *, time_limit_s: float = 30.0, gap: float = 1e-6,
                 domain_caps: Mapping[int, int] | None = None) -> tuple[dict[str, Candidate], MILPResult]:
    """The instance counts per configuration that carry rate scale `theta` (constraint (5) at θ fixed)
    at the least Σ x_mc·ℓ_mc, ℓ_mc each single instance's `cost_s`; replicas of different
    configurations of one LLM allowed (constraints (1'), (2)–(6)). Returns each LLM's mixed
    candidate (`mixed_candidate`) and the solve."""
    import pulp

    if any(c.replicas != 1 or c.more for cs in instances.values() for c in cs):
        raise ValueError("solve_counts takes single instances (replicas = 1)")
    _check_nonempty(instances)
    t0 = time.perf_counter()
    prob, x, s = _model(instances, budget, pulp.LpMinimize, domain_caps, counts=True)
    for k, (m, cs) in enumerate(instances.items()):
        need = calls_per_unit.get(m, 0.0) * theta
        if need > 0:
            prob += pulp.lpSum(c.capacity_rps * x[m, i] for i, c in enumerate(cs)) >= need, f"c5_carry_{k}"
    prob += pulp.lpSum(c.cost_s * x[m, i] for m, cs in instances.items() for i, c in enumerate(cs))
    status, _ = _run(prob, time_limit_s, gap, False)
    elapsed = time.perf_counter() - t0
    _check_status(status, instances, budget, elapsed, time_limit_s)
    choice = {}
    for m, cs in instances.items():
        counts = {c: int(round(x[m, i].value() or 0.0)) for i, c in enumerate(cs)}
        cost = sum(c.cost_s * k for c, k in counts.items())
        choice[m] = mixed_candidate(counts, cost)
    shared = {g: int(round(v.value() or 0.0)) for g, v in s.items()}
    res = MILPResult(choice, shared, float(pulp.value(prob.objective) or 0.0), status, elapsed, len(x) + len(s),
                     time_limit_hit=status == "feasible")
    return choice, res


def choice_key(choice: Mapping[str, Candidate]) -> tuple[tuple[Any, ...], ...]:
    """An allocation's identity: (LLM, tp, fraction, replicas) per LLM and group, sorted."""
    return tuple(sorted((m, *((g.tp, g.gpu_frac, g.replicas) for g in c.groups)) for m, c in choice.items()))


def shared_gpus_needed(choice: Mapping[str, Candidate]) -> dict[str, int]:
    """The fewest GPUs per type that pack the chosen fractional instances (constraints (3), (4))."""
    n: dict[str, list[int]] = {}
    for c in choice.values():
        for g in c.groups:
            if g.quarter:
                k = n.setdefault(g.gpu, [0, 0, 0, 0])
                k[g.quarter] += g.replicas
    return {g: quarter_gpus(n1, n2, n3) for g, (_, n1, n2, n3) in n.items()}
