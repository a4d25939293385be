"""Candidate configurations per LLM deployment and their latency costs ℓ_mc (DESIGN.md §4).

A configuration is (tp, gpu_frac) on one GPU type: tp a power of two up to the NVLink domain, or a
quarter-grid fraction of one GPU at tp = 1; it is kept when the model's weights and a minimal KV
cache fit. A candidate adds the replica count r, from the fewest that carry the load at the
utilisation cap up to what the budget allows.

The cost ℓ_mc is separable: it is what LLM m's calls on the requests' critical paths add up to
under c. Along a fixed set of critical paths (those of the previous allocation; the planner
iterates), each such call costs the profile's per-call model at the candidate's load,
a + b·prompt + tpot·(output − 1), with fan-out bursts priced as alp-cp prices them (a call's
prompt term counts the prompts ahead of it on its replica). Since the model is linear in the
token counts, a path set reduces to a few sums per LLM (`PathWeights`), and each candidate
costs O(1) to price.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from scepsy_hpc.allocate.milp import Candidate
from scepsy_hpc.errors import InfeasibleError
from scepsy_hpc.perf.fit import check_fit
from scepsy_hpc.perf.model import EngineConfig
from scepsy_hpc.predict.alp import pooled_point
from scepsy_hpc.profile.table import ProfilePoint, ProfileTable
from scepsy_hpc.spec.catalog import GPUSpec, ModelSpec
from scepsy_hpc.spec.fractions import QUARTERS, SLOTS, quarter
from scepsy_hpc.trace.graph import CALL, RequestGraph

FRACTIONS = tuple(QUARTERS)  # the quarter grid: 0.25, 0.5, 0.75
MIN_GAIN_S = 0.01   # a candidate using more GPUs must shorten the critical path by ≥ 10 ms per request


def tp_degrees(max_tp: int) -> list[int]:
    """Powers of two up to `max_tp` (the NVLink domain size)."""
    out, tp = [], 1
    while tp <= max_tp:
        out.append(tp)
        tp *= 2
    return out


def fitting_configs(model: ModelSpec, gpu: GPUSpec, max_tp: int, fractions: Iterable[float] = FRACTIONS
                    ) -> list[tuple[int, float]]:
    """(tp, gpu_frac) pairs whose memory holds the weights and a minimal KV cache, smallest first."""
    out = []
    for tp, f in [(1, q) for q in sorted(fractions) if q < 1.0] + [(t, 1.0) for t in tp_degrees(max_tp)]:
        try:
            check_fit(EngineConfig(model, gpu, tp=tp, gpu_frac=f))
        except (InfeasibleError, ValueError):
            continue
        out.append((tp, f))
    return out


def no_fit_message(label: str, model: ModelSpec, gpu_name: str, gpu: GPUSpec, max_tp: int) -> str:
    """Why `model` fits no configuration, from the largest one tried."""
    try:
        check_fit(EngineConfig(model, gpu, tp=max_tp, gpu_frac=1.0), label=label)
    except (InfeasibleError, ValueError) as e:
        return f"{e} (tp is capped at {max_tp}, the NVLink domain of a {gpu_name} node)"
    return f"{label} fits no configuration on {gpu_name}"


@dataclass
class PathWeights:
    """What one LLM's calls on a set of critical paths add up to, averaged per request.

    `count`, `outputs` (Σ output − 1) and `prompts` (Σ own prompt) price unbatched calls;
    `bursts` holds, for each critical call in a fan-out burst, the burst's prompts in release
    order and the call's place in it, so the prompts ahead of it on its replica follow for any r."""

    requests: int
    count: float = 0.0
    outputs: float = 0.0
    prompts: float = 0.0
    bursts: list[tuple[tuple[int, ...], int]] = field(default_factory=list)
    _ahead: dict[int, float] = field(default_factory=dict)

    @property
    def _last(self) -> int:
        """The latest place of a critical call in its burst: with more replicas than that, the
        gateway gives every such call a replica of its own."""
        last = self.__dict__.get("_last_place")
        if last is None or last[0] != len(self.bursts):
            last = self.__dict__["_last_place"] = (len(self.bursts), max((i for _, i in self.bursts), default=0))
        return last[1]

    def prompt_sum(self, replicas: int, shaped: bool) -> float:
        """Σ over the critical calls of the prompt tokens their first token waits for, per request."""
        if shaped or not self.bursts:
            return self.prompts
        r = max(1, replicas)
        if r > self._last:  # each call first on its replica: nothing ahead of it
            return self.prompts
        if r not in self._ahead:
            extra = 0.0
            for prompts, i in self.bursts:
                extra += sum(prompts[j] for j in range(i % r, i + 1, r)) - prompts[i]
            self._ahead[r] = self.prompts + extra / self.requests
        return self._ahead[r]

    def cost(self, p: ProfilePoint, replicas: int, shaped: bool) -> float:
        """Critical-path seconds per request of these calls at the per-call model `p`."""
        return p.ttft_a_s * self.count + p.ttft_b_s * self.prompt_sum(replicas, shaped) + p.tpot_s * self.outputs


def path_weights(graphs: Sequence[RequestGraph], paths: Sequence[Sequence[int]] | None,
                 llms: Iterable[str]) -> dict[str, PathWeights]:
    """Per LLM, the PathWeights of the critical paths `paths` of `graphs` (None: each graph's own)."""
    k = max(1, len(graphs))
    out = {m: PathWeights(k) for m in llms}
    for gi, g in enumerate(graphs):
        path = g.critical_path() if paths is None else paths[gi]
        bursts: dict[tuple[str, tuple[int, ...]], list[int]] | None = None
        for i in path:
            n = g.nodes[i]
            if n.kind != CALL or n.name not in out:
                continue
            w = out[n.name]
            w.count += 1.0 / k
            w.outputs += max(n.output_tokens - 1.0, 0.0) / k
            w.prompts += n.prompt_tokens / k
            if bursts is None:
                bursts = {}
                for j, x in enumerate(g.nodes):
                    if x.kind == CALL:
                        bursts.setdefault((x.name, x.deps), []).append(j)
            members = bursts[(n.name, n.deps)]
            if len(members) > 1:
                order = sorted(members, key=lambda j: g.nodes[j].gap_s)
                w.bursts.append((tuple(g.nodes[j].prompt_tokens for j in order), order.index(i)))
    return out


@dataclass(frozen=True)
class Config:
    """One memory-fitting configuration of a deployment and its profile."""

    tp: int
    gpu_frac: float
    profile: ProfileTable

    @property
    def gpus(self) -> float:
        return self.tp * self.gpu_frac

    def max_replicas(self, budget: int) -> int:
        """Most replicas `budget` GPUs hold (fractions pack k/4 per quarter)."""
        if self.gpu_frac >= 1.0:
            return budget // self.tp
        return (SLOTS * budget) // quarter(self.gpu_frac)


def latency_candidates(gpu: str, configs: Sequence[Config], load_rps: float, budget: int, max_util: float,
                       cost: Callable[[ProfilePoint, int, bool], float], eps: float = 1e-3,
                       min_gain_s: float = MIN_GAIN_S) -> list[Candidate]:
    """Candidates that carry `load_rps` calls/s at utilisation ≤ `max_util`, priced by `cost`,
    Pareto-pruned: a candidate stays only if it costs less than every other of its kind (whole
    GPUs, or one fraction size) that takes no more GPUs — by a relative `eps` and by at least
    `min_gain_s` seconds per request, so GPUs that would buy almost nothing stay free."""
    # Candidates are made per kind (whole GPUs / each fraction size) in the order `pareto` visits
    # them (GPUs, then cost), following its running best; a configuration stops as soon as even its
    # cost floor (`_cost_floor`) cannot beat that best by the margin: no later replica count of it
    # would be kept. `pareto` then runs on what was made, in the usual order: the same result as
    # pricing every replica count up to the budget (32 LLMs on 1,024 GPUs: ~300,000 points → a few thousand).
    made: list[list[Candidate]] = [[] for _ in configs]
    kinds: dict[int, list[int]] = {}
    gens = []
    for ci, c in enumerate(configs):
        mu = c.profile.capacity_rps
        if mu <= 0:
            gens.append(None)
            continue
        r0 = max(1, math.ceil(load_rps / (mu * max_util) - 1e-9))
        shaped = c.profile.arrivals == "requests"
        gens.append(_replica_costs(gpu, c, load_rps, r0, c.max_replicas(budget), cost, shaped))
        kinds.setdefault(quarter(c.gpu_frac), []).append(ci)
    for members in kinds.values():
        floors = {ci: _cost_floor(configs[ci].profile, cost, configs[ci].profile.arrivals == "requests") for ci in members}
        heap: list[tuple[float, float, int, int, Candidate]] = []
        seq = 0

        def push(ci: int) -> None:
            nonlocal seq
            nxt = next(gens[ci], None)  # type: ignore[call-overload]
            if nxt is not None:
                heapq.heappush(heap, (nxt.gpus, nxt.cost_s, seq, ci, nxt))
                seq += 1

        for ci in members:
            push(ci)
        best = math.inf
        while heap:
            _, k, _, ci, c = heapq.heappop(heap)
            made[ci].append(c)
            if not math.isfinite(best) or k < best - max(eps * abs(best), min_gain_s):
                best = k
            floor = floors[ci]
            if floor is not None and math.isfinite(best) and floor >= best - max(eps * abs(best), min_gain_s):
                continue  # no later replica count of this configuration can be kept
            push(ci)
    raw = [c for cs in made for c in cs]
    return pareto(raw, lambda c: c.cost_s, eps, min_gain_s)


def _replica_costs(gpu: str, c: Config, load_rps: float, r0: int, r1: int,
                   cost: Callable[[ProfilePoint, int, bool], float], shaped: bool) -> Iterator[Candidate]:
    """Configuration `c`'s candidates at r0 … r1 replicas (those below capacity), priced by `cost`."""
    mu = c.profile.capacity_rps
    for r in range(r0, r1 + 1):
        p = pooled_point(c.profile, load_rps / r, r)
        if p is not None:
            yield Candidate(gpu, c.tp, c.gpu_frac, r, cost(p, r, shaped), r * mu)


def _cost_floor(profile: ProfileTable, cost: Callable[[ProfilePoint, int, bool], float], shaped: bool) -> float | None:
    """A lower bound on `cost` at any load and replica count of `profile`, or None when none is
    known. `cost` must be a `weights_cost` (non-negative weights on a, b and tpot) and every fitted
    point's a, b, tpot non-negative. Then each point `pooled_point` can return costs at least the
    least of the fitted points' costs with a lowered to the unloaded a and no burst queueing:
    an interpolated point's fields are a convex combination of two fitted points' (and cost is
    linear in them), the queue growth past the last point only raises its fields, pooling only
    lowers a towards the unloaded a, and prompts ahead in a burst only add (b ≥ 0)."""
    if not getattr(cost, "monotone", False):
        return None
    pts = profile._fit  # type: ignore[attr-defined]
    if not pts or any(min(q.ttft_a_s, q.ttft_b_s, q.tpot_s) < 0 for q in pts):
        return None
    a0 = pts[0].ttft_a_s
    return min(cost(replace(q, ttft_a_s=min(q.ttft_a_s, a0)), 1 << 30, True) for q in pts)


def capacity_candidates(gpu: str, configs: Sequence[Config], budget: int, eps: float = 1e-3) -> list[Candidate]:
    """Every replica count of every configuration, kept when it carries more (by `eps`) than any
    of its kind that takes no more GPUs (for the throughput MILP, where cost is irrelevant)."""
    raw = [Candidate(gpu, c.tp, c.gpu_frac, r, 0.0, r * c.profile.capacity_rps)
           for c in configs if c.profile.capacity_rps > 0 for r in range(1, c.max_replicas(budget) + 1)]
    return pareto(raw, lambda c: -c.capacity_rps, eps)


def pareto(cands: Sequence[Candidate], badness: Callable[[Candidate], float], eps: float,
           min_gain: float = 0.0) -> list[Candidate]:
    """Keep, per kind (whole GPUs / each fraction size; a mixed group: the set of sizes it packs), the
    candidates whose `badness` beats every candidate of that kind using no more GPUs by more than the
    relative tolerance `eps` and the absolute `min_gain`."""
    kinds: dict[tuple[int, ...], list[Candidate]] = {}
    for c in cands:
        kinds.setdefault(c.kind, []).append(c)
    out = []
    for group in kinds.values():
        group.sort(key=lambda c: (c.gpus, badness(c)))
        best = math.inf
        for c in group:
            b = badness(c)
            if not math.isfinite(best) or b < best - max(eps * abs(best), min_gain):
                out.append(c)
                best = b
    return out


def weights_cost(weights: Mapping[str, PathWeights]) -> Callable[[ProfilePoint, int, bool], float]:
    """The cost function of a deployment serving the (workflow, LLM) path weights given."""
    def cost(p: ProfilePoint, r: int, shaped: bool) -> float:
        return sum(w.cost(p, r, shaped) for w in weights.values())
    cost.monotone = True  # type: ignore[attr-defined]   # non-negative weights: see _cost_floor
    return cost


PRUNE_ABOVE = 400   # candidates in all above which `prune_by_bound` prunes (small problems go to HiGHS whole)


def prune_by_bound(cands: Mapping[str, list[Candidate]], n_gpus: int,
                   fits: Callable[[Mapping[str, Candidate]], bool], above: int = PRUNE_ABOVE,
                   rel_tol: float = 1e-6) -> dict[str, list[Candidate]]:
    """`cands` without the candidates that cannot be in any optimum of the latency MILP, when
    there are more than `above` of them (else `cands` as given).

    Any allocation the MILP accepts has Σ_m γ_m ≤ N (γ = tp·r·f; constraints (2)–(4)), so for a GPU
    price λ ≥ 0 the Lagrangian D(λ) = Σ_m min_c (ℓ_mc + λγ_mc) − λN is a lower bound on its
    optimum, and D(λ) + (ℓ_mc + λγ_mc − min_c' (ℓ_mc' + λγ_mc')) on every allocation that uses c.
    With U the objective of a feasible allocation (`fits`: the MILP's packing and NVLink-domain
    caps), a candidate whose bound exceeds U (by `rel_tol`) cannot be optimal: it is dropped. λ
    is where the Lagrangian's choice just fits the GPUs (bisection; near D's maximum), U the
    allocation chosen there improved greedily. The optimum's value is unchanged; only the
    candidates HiGHS has to branch over shrink (32 LLMs on 1,024 GPUs: ~3,300 → a few hundred)."""
    total = sum(len(cs) for cs in cands.values())
    if total <= above or any(not cs for cs in cands.values()):
        return dict(cands)
    names = list(cands)

    def pick(lam: float) -> dict[str, Candidate]:
        return {m: min(cs, key=lambda c: (c.cost_s + lam * c.gpus, c.gpus)) for m, cs in cands.items()}

    def gpus(choice: Mapping[str, Candidate]) -> float:
        return sum(c.gpus for c in choice.values())

    hi = 1.0
    while gpus(pick(hi)) > n_gpus:
        hi *= 4
        if hi > 1e12:
            return dict(cands)   # even the smallest candidates do not fit: leave it to the MILP
    lo = 0.0
    if gpus(pick(lo)) <= n_gpus:
        hi = 0.0
    else:
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if gpus(pick(mid)) > n_gpus:
                lo = mid
            else:
                hi = mid
    best = pick(hi)
    if not fits(best):
        return dict(cands)
    # greedy: give each LLM in turn its cheapest candidate that still fits, while it helps
    improved = True
    while improved:
        improved = False
        for m in names:
            for c in sorted(cands[m], key=lambda c: c.cost_s):
                if c.cost_s >= best[m].cost_s - 1e-12:
                    break
                trial = {**best, m: c}
                if fits(trial):
                    best, improved = trial, True
                    break
    upper = sum(c.cost_s for c in best.values())
    slack = rel_tol * max(abs(upper), 1.0)
    out = {m: list(cs) for m, cs in cands.items()}
    for lam in {lo, hi}:  # each price's bound is valid: a candidate stays only when no bound excludes it
        mins = {m: min(c.cost_s + lam * c.gpus for c in cs) for m, cs in cands.items()}
        dual = sum(mins.values()) - lam * n_gpus
        out = {m: [c for c in cs if dual + c.cost_s + lam * c.gpus - mins[m] <= upper + slack] for m, cs in out.items()}
    return out
