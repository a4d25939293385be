"""Placement: constraints on random instances, node count against the exact MILP, errors, fragmentation."""

from __future__ import annotations

import random

import pytest

from scepsy_hpc.place.exact import place_exact
from scepsy_hpc.place.placement import (PlacementError, domain_caps, lower_bound_nodes, place,
                                        wants_of)
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.topology.model import Network, Node, Switch, Topology

DOMAIN_SHAPES = {
    "all8": ((0, 1, 2, 3, 4, 5, 6, 7),),
    "all4": ((0, 1, 2, 3),),
    "pairs4": ((0, 1), (2, 3)),
    "pairs8": ((0, 1), (2, 3), (4, 5), (6, 7)),
    "none4": ((0,), (1,), (2,), (3,)),
    "quads8": ((0, 1, 2, 3), (4, 5, 6, 7)),
    "odd3": ((0, 1), (2,)),
}


def topology(shapes: list[str], per_leaf: int = 2, free: dict[int, set[int]] | None = None, gpu_type: str = "h100-sxm") -> Topology:
    """Nodes n0.. with the given NVLink domain shapes, `per_leaf` nodes under each leaf switch."""
    nodes = []
    for i, s in enumerate(shapes):
        doms = DOMAIN_SHAPES[s]
        f = frozenset(free[i]) if free and i in free else None
        nodes.append(Node(f"n{i}", gpu_type, 80.0, doms, f, f"leaf{i // per_leaf}"))
    leaves = {}
    for n in nodes:
        leaves.setdefault(n.leaf, []).append(n.name)
    net = Network(switches={lf: Switch(lf, 0, tuple(ns)) for lf, ns in leaves.items()})
    return Topology(tuple(nodes), net)


def random_case(rng: random.Random, max_nodes: int) -> tuple[dict[str, LLMAlloc], Topology]:
    shapes = [rng.choice(list(DOMAIN_SHAPES)) for _ in range(rng.randint(1, max_nodes))]
    free = {}
    for i, s in enumerate(shapes):
        if rng.random() < 0.25:
            gpus = [g for d in DOMAIN_SHAPES[s] for g in d]
            free[i] = set(rng.sample(gpus, rng.randint(1, len(gpus))))
    topo = topology(shapes, per_leaf=rng.choice([1, 2, 3]), free=free)
    total = sum(len(d) for n in topo.nodes for d in n.free())
    biggest = max(len(d) for n in topo.nodes for d in n.free())
    alloc: dict[str, LLMAlloc] = {}
    used = 0.0
    for k in range(rng.randint(1, 5)):
        if rng.random() < 0.35:
            a = LLMAlloc(tp=1, gpu_frac=rng.choice([0.25, 0.5, 0.75]), replicas=rng.randint(1, 4))
        else:
            tps = [t for t in (1, 2, 4, 8) if t <= biggest]
            a = LLMAlloc(tp=rng.choice(tps), replicas=rng.randint(1, 3))
        if used + a.gpus > total * 0.9:
            break
        used += a.gpus
        alloc[f"llm{k}"] = a
    if not alloc:
        alloc["llm0"] = LLMAlloc(tp=1, gpu_frac=0.25)
    return alloc, topo


def check_valid(alloc: dict[str, LLMAlloc], topo: Topology, placement) -> None:
    """Every constraint a placement must keep."""
    wanted = {(w.llm, w.replica) for w in wants_of(alloc)}
    got = [(p.llm, p.replica) for p in placement.instances]
    assert sorted(got) == sorted(wanted), "every instance placed exactly once"
    whole: set[tuple[str, int]] = set()
    share: dict[tuple[str, int], float] = {}
    ports: set[tuple[str, int]] = set()
    for p in placement.instances:
        node = topo.node(p.node)
        a = alloc[p.llm]
        assert len(p.gpus) == a.tp and p.gpu_frac == a.gpu_frac
        free = {g for d in node.free() for g in d}
        assert set(p.gpus) <= free, f"{p} uses a GPU that is not free"
        assert any(set(p.gpus) <= set(d) for d in node.nvlink_domains), f"{p}: TP group spans NVLink domains"
        assert (p.node, p.port) not in ports, "ports unique per node"
        ports.add((p.node, p.port))
        for g in p.gpus:
            if p.gpu_frac >= 1.0:
                assert (p.node, g) not in whole and (p.node, g) not in share, f"GPU {p.node}:{g} used twice"
                whole.add((p.node, g))
            else:
                assert (p.node, g) not in whole, f"GPU {p.node}:{g} shared with a whole instance"
                share[p.node, g] = share.get((p.node, g), 0.0) + p.gpu_frac
        assert p.mem_frac <= p.gpu_frac + 1e-9
    mem: dict[tuple[str, int], float] = {}
    for p in placement.instances:
        for g in p.gpus:
            mem[p.node, g] = mem.get((p.node, g), 0.0) + p.mem_frac
    assert all(v <= 1.0 + 1e-9 for v in share.values()), "fractions on one GPU sum to at most 1"
    assert all(v <= 1.0 + 1e-9 for v in mem.values()), "co-located memory fits the GPU"
    fr = placement.fragmentation
    assert fr.nodes_used == len(placement.nodes()) >= fr.nodes_min
    assert fr.gpus_used == len(whole) + len(share)


@pytest.mark.parametrize("seed", range(150))
def test_random_placements_keep_every_constraint(seed: int) -> None:
    rng = random.Random(seed)
    alloc, topo = random_case(rng, 6)
    try:
        placement = place(alloc, topo, gpu_type="h100-sxm")
    except PlacementError:
        # only when no placement exists at all
        assert place_exact(wants_of(alloc), topo.nodes) is None
        return
    check_valid(alloc, topo, placement)


@pytest.mark.parametrize("seed", range(120))
def test_small_instances_use_as_few_nodes_as_the_exact_milp(seed: int) -> None:
    rng = random.Random(1000 + seed)
    alloc, topo = random_case(rng, 4)
    exact = place_exact(wants_of(alloc), topo.nodes)
    try:
        placement = place(alloc, topo, gpu_type="h100-sxm")
    except PlacementError:
        assert exact is None
        return
    assert exact is not None
    assert placement.fragmentation.nodes_used == len(exact[0])


@pytest.mark.parametrize("seed", range(60))
def test_heuristic_alone_matches_exact_on_power_of_two_boards(seed: int) -> None:
    """Without the exact fallback: NVSwitch / quad / pair boards, all free, quarter fractions."""
    rng = random.Random(5000 + seed)
    shapes = [rng.choice(["all8", "all4", "pairs8", "quads8"]) for _ in range(rng.randint(1, 4))]
    topo = topology(shapes)
    total = sum(n.n_gpus for n in topo.nodes)
    biggest = max(len(d) for n in topo.nodes for d in n.nvlink_domains)
    alloc, used = {}, 0.0
    for k in range(rng.randint(1, 5)):
        a = (LLMAlloc(tp=1, gpu_frac=rng.choice([0.25, 0.5, 0.75]), replicas=rng.randint(1, 4)) if rng.random() < 0.3
             else LLMAlloc(tp=rng.choice([t for t in (1, 2, 4, 8) if t <= biggest]), replicas=rng.randint(1, 2)))
        if used + a.gpus + 1 > total:
            break
        used += a.gpus
        alloc[f"m{k}"] = a
    if not alloc:
        return
    exact = place_exact(wants_of(alloc), topo.nodes)
    try:
        placement = place(alloc, topo, exact=False)
    except PlacementError:
        assert exact is None
        return
    check_valid(alloc, topo, placement)
    assert exact is not None and placement.method == "heuristic"
    assert placement.fragmentation.nodes_used == len(exact[0])


def test_tp_groups_stay_inside_nvlink_pairs_and_fractions_share_gpus() -> None:
    topo = topology(["pairs4", "pairs4"])
    alloc = {"big": LLMAlloc(tp=2, replicas=3), "small": LLMAlloc(tp=1, gpu_frac=0.25, replicas=4),
             "half": LLMAlloc(tp=1, gpu_frac=0.5, replicas=2)}
    placement = place(alloc, topo)
    check_valid(alloc, topo, placement)
    shared = {(p.node, p.gpus) for p in placement.instances if p.gpu_frac < 1}
    assert len(shared) == 2     # four quarters on one GPU, two halves on another
    assert placement.fragmentation.partial_gpus == 0
    assert placement.fragmentation.nodes_used == 2


def test_fewest_nodes_then_fewest_leaf_switches() -> None:
    # n0,n1 under leaf0 (n1 half busy), n2,n3 under leaf1; 12 GPUs needed: any placement takes two
    # nodes, and the two free nodes of leaf1 hold it under one leaf switch
    topo = topology(["all8", "all8", "all8", "all8"], per_leaf=2, free={1: {0, 1, 2, 3}})
    alloc = {"a": LLMAlloc(tp=8, replicas=1), "b": LLMAlloc(tp=4, replicas=1)}
    placement = place(alloc, topo)
    check_valid(alloc, topo, placement)
    fr = placement.fragmentation
    assert (fr.nodes_used, fr.leaves_used, fr.nodes_min, fr.leaves_min) == (2, 1, 2, 1)
    assert sorted(placement.nodes()) == ["n2", "n3"]
    assert fr.free_whole_nodes == 1 and fr.idle_gpus_on_used_nodes == 4


def test_large_cluster_prefers_one_leaf() -> None:
    shapes = ["all8"] * 40
    topo = topology(shapes, per_leaf=5)
    alloc = {"a": LLMAlloc(tp=8, replicas=3), "b": LLMAlloc(tp=4, replicas=3), "c": LLMAlloc(tp=1, gpu_frac=0.5, replicas=3)}
    placement = place(alloc, topo)
    check_valid(alloc, topo, placement)
    fr = placement.fragmentation
    assert fr.nodes_used == fr.nodes_min == 5 and fr.leaves_used == 1


def test_tp_larger_than_every_domain_names_the_instance() -> None:
    topo = topology(["pairs8", "pairs8"])
    with pytest.raises(PlacementError) as err:
        place({"gen": LLMAlloc(tp=4, replicas=1)}, topo)
    msg = str(err.value)
    assert "'gen' replica 0 (tp=4)" in msg and "largest free NVLink domain has 2 GPU(s)" in msg
    assert err.value.want is not None and err.value.want.tp == 4


def test_fragmented_free_gpus_fail_by_shape_not_count() -> None:
    # 6 free GPUs in all, but only two nodes have two of them
    topo = topology(["all4"] * 4, free={0: {0, 1}, 1: {2, 3}, 2: {1}, 3: {3}})
    with pytest.raises(PlacementError) as err:
        place({"a": LLMAlloc(tp=4, replicas=1)}, topo)
    assert "largest free NVLink domain has 2" in str(err.value)
    alloc = {"a": LLMAlloc(tp=2, replicas=3)}
    with pytest.raises(PlacementError) as err2:
        place(alloc, topo)
    assert err2.value.placed_of_shape == 2
    assert "only 2 group(s) of 2 GPUs" in str(err2.value)


def test_too_few_gpus_and_wrong_type_are_clear() -> None:
    topo = topology(["all4"])
    with pytest.raises(PlacementError, match="needs 8 GPUs; the topology has 4 free h100-sxm GPUs on 1 node"):
        place({"a": LLMAlloc(tp=4, replicas=2)}, topo, gpu_type="h100-sxm")
    with pytest.raises(PlacementError, match="no node with free a100-80g GPUs .types there: h100-sxm"):
        place({"a": LLMAlloc(tp=1)}, topo, gpu_type="a100-80g")


def test_ports_memory_and_mps_of_colocated_instances() -> None:
    topo = topology(["all4"])
    placement = place({"x": LLMAlloc(tp=1, gpu_frac=0.5, replicas=2), "y": LLMAlloc(tp=2)}, topo, base_port=9000)
    by = {(p.llm, p.replica): p for p in placement.instances}
    assert by["x", 0].gpus == by["x", 1].gpus
    assert {by["x", 0].port, by["x", 1].port, by["y", 0].port} == {9000, 9001, 9002}
    assert by["x", 0].mps_pct == 50 and by["y", 0].mps_pct == 100
    assert by["x", 0].mem_frac == pytest.approx(0.45) and by["y", 0].mem_frac == pytest.approx(0.9)
    assert [p["llm"] for p in placement.as_list()] == ["x", "x", "y"]


def test_domain_caps_and_bounds() -> None:
    topo = topology(["all8", "pairs4", "odd3"], free={0: {0, 1, 2, 3, 4, 5}})
    caps = domain_caps(topo, None, max_tp=8)
    # free domains: 6 GPUs (node 0), two pairs, a pair and a single
    assert caps == {1: 6 + 4 + 3, 2: 3 + 2 + 1, 4: 1, 8: 0}
    assert lower_bound_nodes({"a": LLMAlloc(tp=2, replicas=4)}, topo) == 2
