"""A plan's `placement:` checked against its allocation, the cluster spec and itself.

`validate --cluster C` and `up` (before anything starts) call `check_placement`; `check_plan` calls
it without a cluster for what a plan can say about itself. Every problem names the file and line of
the entry.
"""

from __future__ import annotations

from typing import Any

from scepsy_hpc.spec.cluster import ClusterSpec
from scepsy_hpc.spec.fractions import EPS
from scepsy_hpc.spec.placement_entry import PlacementEntry
from scepsy_hpc.spec.source import SourceMap, suggest
from scepsy_hpc.spec.workflow_bounds import NAME, NAME_RULE


def _entry_problems(k: int, entry: PlacementEntry, alloc: Any, where: str, nodes: dict[str, int] | None) -> list[str]:
    """What is wrong with one entry on its own (its LLM, node, GPU indices, fractions)."""
    problems: list[str] = []
    if not NAME.fullmatch(entry.node):
        problems.append(f"{where}: placement[{k}].node: {entry.node!r} is not a node name; use {NAME_RULE}")
    elif nodes is not None and entry.node not in nodes:
        problems.append(f"{where}: placement[{k}].node: {entry.node!r} is not a node of the cluster; {suggest(entry.node, nodes)}")
    if len(set(entry.gpus)) != len(entry.gpus):
        problems.append(f"{where}: placement[{k}].gpus: {entry.gpus} names a GPU twice")
    if nodes is not None and entry.node in nodes:
        bad = [g for g in entry.gpus if g >= nodes[entry.node]]
        if bad:
            problems.append(f"{where}: placement[{k}].gpus: GPU index {bad[0]} on node {entry.node!r}, which has "
                            f"{nodes[entry.node]} GPUs (0..{nodes[entry.node] - 1})")
    if alloc is not None:
        if entry.gpu_frac is not None and abs(entry.gpu_frac - alloc.gpu_frac) > EPS:
            problems.append(f"{where}: placement[{k}].gpu_frac: {entry.gpu_frac:g} differs from the allocation's "
                            f"gpu_frac {alloc.gpu_frac:g} for {entry.llm!r}")
        frac = entry.gpu_frac if entry.gpu_frac is not None else alloc.gpu_frac
        if entry.mem_frac is not None and entry.mem_frac > frac + EPS:
            problems.append(f"{where}: placement[{k}].mem_frac: {entry.mem_frac:g} exceeds gpu_frac {frac:g}: engines "
                            f"sharing the GPU would together ask for more memory than it has")
    return problems


def check_placement(plan: Any, cluster: ClusterSpec | None, smap: SourceMap) -> list[str]:
    """Problems of `plan.placement` (a `spec.plan.Plan`): every instance of the allocation placed once on
    tp distinct GPUs, shares per GPU at most 1, one port per engine on a node; with `cluster`, every node
    one of its nodes and every GPU index below that node's GPU count. [] when there is no placement."""
    if plan.placement is None:
        return []
    from scepsy_hpc.spec.plan import replica_groups  # plan imports this module

    nodes: dict[str, int] | None = None
    if cluster is not None and cluster.node_groups:
        nodes = {host: g.gpus_per_node for g in cluster.node_groups for host in g.host_names()}
    problems: list[str] = []
    seen: set[tuple[str, int]] = set()
    share: dict[tuple[str, int], float] = {}
    ports: dict[tuple[str, int], int] = {}
    for k, entry in enumerate(plan.placement):
        where = smap.where(("placement", k))
        llm, rep, gpus = entry.llm, entry.replica, entry.gpus
        if llm not in plan.allocation:
            problems.append(f"{where}: placement[{k}].llm: {llm!r} is not in the allocation; {suggest(str(llm), plan.allocation)}")
            continue
        per_replica = replica_groups(plan.allocation[llm])
        if not 0 <= rep < len(per_replica) or (llm, rep) in seen:
            problems.append(f"{where}: placement[{k}].replica: {rep!r} is not a free replica number of {llm!r} "
                            f"(0..{len(per_replica) - 1}, each once)")
            continue
        seen.add((llm, rep))
        a = per_replica[rep]
        if len(gpus) != a.tp:
            problems.append(f"{where}: placement[{k}].gpus: {gpus!r} must list {a.tp} GPU index(es) for tp={a.tp}"
                            + ("" if len(per_replica) == a.replicas else f" (replica {rep} of {llm!r} is a {a.describe()} instance "
                                                                  f"of its mixed group)"))
            continue
        mine = _entry_problems(k, entry, a, where, nodes)
        problems += mine
        if mine:
            continue
        # A port left out of the entry is the default, which the node agent moves up to a free one; only
        # ports written twice on one node are a mistake.
        first = ports.setdefault((entry.node, entry.port), k) if "port" in entry.model_fields_set else k
        if first != k:
            problems.append(f"{where}: placement[{k}].port: port {entry.port} on node {entry.node!r} is already "
                            f"placement[{first}]'s; give each engine on a node its own port")
        for g in gpus:
            key = (entry.node, g)
            share[key] = share.get(key, 0.0) + a.gpu_frac
            if share[key] > 1.0 + EPS:
                problems.append(f"{where}: placement[{k}]: GPU {g} of node {key[0]} is given out beyond its whole "
                                f"(Σ gpu_frac = {share[key]:g})")
    missing = [f"{m}·{r}" for m, e in plan.allocation.items() for r in range(len(replica_groups(e))) if (m, r) not in seen]
    if missing:
        problems.append(f"{smap.where(('placement',))}: placement: instance(s) {', '.join(missing[:6])}"
                        f"{' …' if len(missing) > 6 else ''} are not placed; re-run `scepsy plan --cluster` or drop placement:")
    return problems
