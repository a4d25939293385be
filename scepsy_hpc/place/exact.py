"""Exact placement as a MILP (PuLP + HiGHS), for small clusters and as the yardstick in tests.

GPUs inside one NVLink domain are interchangeable, so the model counts per domain rather than
assigning GPUs.

Sets        N nodes, D domains (d ∈ D_n of node n, with S_d free GPUs), T tp degrees wanted,
            K = {1, 2, 3} quarter sizes of fractional instances, Λ leaf switches
Parameters  c_t tp-t groups wanted, a_k instances of size k/4 wanted
Variables   z_td ∈ ℤ≥0 tp-t groups in d; q_kd ∈ ℤ≥0 size-k/4 instances in d; F_d ∈ ℤ≥0 GPUs of d
            shared by fractions; u_n ∈ {0,1} node n used; v_λ ∈ {0,1} leaf λ used
Objective   minimise (|Λ| + 1)·Σ_n u_n + Σ_λ v_λ          fewest nodes, then fewest leaves
Constraints (1) Σ_d z_td = c_t  ∀t;  Σ_d q_kd = a_k  ∀k                  everything placed
            (2) Σ_t t·z_td + F_d ≤ S_d·u_n   ∀d ∈ D_n                   the domain holds it
            (3) 4·F_d ≥ Σ_k k·q_kd;  F_d ≥ q_3d + q_2d / 2   ∀d          fractions pack onto F_d GPUs
            (4) v_λ ≥ u_n  ∀n under λ;  Σ_n u_n ≤ max_nodes
"""

from __future__ import annotations

from typing import Any, Sequence

from scepsy_hpc.allocate.solver import solve_highs
from scepsy_hpc.place.placement import Want, _leaf
from scepsy_hpc.spec.fractions import LARGE_SHARE, QUARTERS, SLOTS, on_quarter_grid, quarter
from scepsy_hpc.topology.model import Node

SIZES = tuple(QUARTERS.values())  # K


def place_exact(wants: Sequence[Want], nodes: Sequence[Node], *, max_nodes: int | None = None,
                time_limit_s: float = 20.0) -> tuple[list[Node], list[tuple[Want, int, tuple[int, ...]]]] | None:
    """The placement with the fewest nodes, then leaves: (nodes used, [(want, index into them, gpus)]),
    or None when none uses at most `max_nodes` (or fractions are off the quarter grid)."""
    import pulp

    fr = [w for w in wants if w.gpu_frac < 1.0]
    if not all(on_quarter_grid(w.gpu_frac) for w in fr):
        return None
    groups = [w for w in wants if w.gpu_frac >= 1.0]
    tps = sorted({w.tp for w in groups}, reverse=True)
    doms = [(ni, di, d) for ni, n in enumerate(nodes) for di, d in enumerate(n.free()) if d]
    leaves = sorted({_leaf(n) for n in nodes}, key=str)
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    u = [prob.add_variable(f"u_{i}", cat="Binary") for i in range(len(nodes))]
    v = {lf: prob.add_variable(f"v_{j}", cat="Binary") for j, lf in enumerate(leaves)}
    z = {(t, j): prob.add_variable(f"z_{t}_{j}", lowBound=0, cat="Integer")
         for t in tps for j, (_, _, d) in enumerate(doms) if len(d) >= t}
    q = {(k, j): prob.add_variable(f"q_{k}_{j}", lowBound=0, cat="Integer") for k in SIZES for j in range(len(doms))}
    f = {j: prob.add_variable(f"F_{j}", lowBound=0, cat="Integer") for j in range(len(doms))}
    prob += (len(leaves) + 1) * pulp.lpSum(u) + pulp.lpSum(v.values())
    for t in tps:
        prob += pulp.lpSum(var for (tt, _), var in z.items() if tt == t) == sum(1 for w in groups if w.tp == t)
    for k in SIZES:
        prob += pulp.lpSum(q[k, j] for j in range(len(doms))) == sum(1 for w in fr if quarter(w.gpu_frac) == k)
    for j, (ni, _, d) in enumerate(doms):
        prob += pulp.lpSum(t * z[t, j] for t in tps if (t, j) in z) + f[j] <= len(d) * u[ni]
        prob += SLOTS * f[j] >= pulp.lpSum(k * q[k, j] for k in SIZES)
        prob += f[j] >= pulp.lpSum(share * q[k, j] for k, share in LARGE_SHARE.items())
    for ni, n in enumerate(nodes):
        prob += v[_leaf(n)] >= u[ni]
    if max_nodes is not None:
        prob += pulp.lpSum(u) <= max_nodes
    solve_highs(prob, "placement MILP", time_limit_s=time_limit_s)
    if pulp.LpStatus[prob.status] != "Optimal" or prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None
    return _unpack(nodes, doms, groups, fr, tps, z, q, f, u)


def _val(var: Any) -> int:
    return int(round(var.value() or 0.0))


def _unpack(nodes: Sequence[Node], doms: list, groups: Sequence[Want], fr: Sequence[Want], tps: list[int],
            z: dict, q: dict, f: dict, u: list) -> tuple[list[Node], list[tuple[Want, int, tuple[int, ...]]]]:
    used = [ni for ni in range(len(nodes)) if _val(u[ni])]
    index = {ni: i for i, ni in enumerate(used)}
    todo_g = {t: [w for w in groups if w.tp == t] for t in tps}
    todo_f = {k: [w for w in fr if quarter(w.gpu_frac) == k] for k in SIZES}
    out: list[tuple[Want, int, tuple[int, ...]]] = []
    for j, (ni, _, d) in enumerate(doms):
        gpus = list(d)
        for t in tps:
            for _ in range(_val(z[t, j]) if (t, j) in z else 0):
                out.append((todo_g[t].pop(0), index[ni], tuple(gpus[:t])))
                gpus = gpus[t:]
        bins: list[list[Any]] = [[0, g] for g in gpus[:_val(f[j])]]
        for k in reversed(SIZES):
            for _ in range(_val(q[k, j])):
                b = max((b for b in bins if b[0] + k <= SLOTS), key=lambda b: b[0])
                b[0] += k
                out.append((todo_f[k].pop(0), index[ni], (b[1],)))
    return [nodes[ni] for ni in used], out
