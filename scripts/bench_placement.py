#!/usr/bin/env python3
"""Placement at scale: 500 instances on a 1024-GPU, 128-node, 8-leaf-switch cluster.

Nodes have 8 GPUs on one NVSwitch; 16 nodes hang off each leaf switch. The allocation mixes
tensor-parallel groups (tp 8, 4, 2), whole single GPUs and quarter-grid fractions — 500 instances.
Two cases: every node free, and a busy cluster where a third of the nodes already run jobs on some
of their GPUs. Printed side by side with a naive first-fit (instances in LLM order onto nodes in
name order): time, nodes used against the lower bound, leaf switches used, partly used GPUs.

    .venv/bin/python scripts/bench_placement.py [--nodes 128] [--per-leaf 16] [--seed 0] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scepsy_hpc.place.placement import place, wants_of  # noqa: E402
from scepsy_hpc.spec.plan import LLMAlloc  # noqa: E402
from scepsy_hpc.topology.model import Network, Node, Switch, Topology  # noqa: E402


def cluster(n_nodes: int, per_leaf: int, busy_frac: float, rng: random.Random) -> Topology:
    nodes = []
    for i in range(n_nodes):
        free = None
        if rng.random() < busy_frac:
            free = frozenset(rng.sample(range(8), rng.randint(2, 6)))
        nodes.append(Node(f"gpu{i:03d}", "h100-sxm", 80.0, (tuple(range(8)),), free, f"leaf{i // per_leaf}"))
    leaves: dict[str, list[str]] = {}
    for n in nodes:
        leaves.setdefault(n.leaf, []).append(n.name)
    sw = {lf: Switch(lf, 0, tuple(ns)) for lf, ns in leaves.items()}
    sw["spine"] = Switch("spine", 1, (), tuple(leaves))
    return Topology(tuple(nodes), Network(switches=sw))


def allocation(scale: float) -> dict[str, LLMAlloc]:
    """500 instances: 40 LLMs of mixed shapes; `scale` shrinks replica counts for the busy case."""
    shapes = [(8, 1.0, 3), (4, 1.0, 8), (2, 1.0, 10), (1, 1.0, 12), (1, 0.75, 8), (1, 0.5, 15), (1, 0.25, 20)]
    alloc, k = {}, 0
    while sum(a.replicas for a in alloc.values()) < 500:
        tp, frac, reps = shapes[k % len(shapes)]
        left = 500 - sum(a.replicas for a in alloc.values())
        alloc[f"llm{k:02d}"] = LLMAlloc(tp=tp, gpu_frac=frac, replicas=max(1, min(left, int(reps * scale))))
        k += 1
    return alloc


def first_fit(alloc: dict[str, LLMAlloc], topo: Topology) -> tuple[int, int, int]:
    """Naive baseline: instances in LLM order, first node (by name) with room; (nodes, leaves, partial GPUs)."""
    free = {n.name: [g for d in n.free() for g in d] for n in topo.nodes}
    shared: dict[tuple[str, int], float] = {}
    used: set[str] = set()
    for w in wants_of(alloc):
        for n in topo.nodes:
            if w.gpu_frac < 1.0:
                spot = next((key for key, v in shared.items() if key[0] == n.name and v + w.gpu_frac <= 1 + 1e-9), None)
                if spot is None and free[n.name]:
                    spot = (n.name, free[n.name].pop(0))
                    shared[spot] = 0.0
                if spot is not None:
                    shared[spot] += w.gpu_frac
                    used.add(n.name)
                    break
            elif len(free[n.name]) >= w.tp:
                del free[n.name][:w.tp]
                used.add(n.name)
                break
        else:
            raise SystemExit(f"first-fit could not place {w}")
    leaves = {topo.node(n).leaf for n in used}
    return len(used), len(leaves), sum(1 for v in shared.values() if v < 1 - 1e-9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=128)
    ap.add_argument("--per-leaf", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"{'case':<10} {'inst':>5} {'GPUs':>5} {'time s (median of ' + str(args.repeat) + ')':>24} {'nodes':>6} {'≥LB':>4} "
          f"{'leaves':>6} {'≥LB':>4} {'partial':>7} | {'first-fit nodes':>15} {'leaves':>6} {'partial':>7}")
    for case, busy, scale in (("all free", 0.0, 1.0), ("busy", 0.35, 0.8)):
        topo = cluster(args.nodes, args.per_leaf, busy, rng)
        alloc = allocation(scale)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            p = place(alloc, topo, gpu_type="h100-sxm")
            times.append(time.perf_counter() - t0)
        fr = p.fragmentation
        ff = first_fit(alloc, topo)
        print(f"{case:<10} {len(p.instances):>5} {fr.gpus_used:>5} {statistics.median(times):>24.3f} {fr.nodes_used:>6} "
              f"{fr.nodes_min:>4} {fr.leaves_used:>6} {fr.leaves_min:>4} {fr.partial_gpus:>7} | {ff[0]:>15} {ff[1]:>6} {ff[2]:>7}")
        print(f"{'':<10} nodes vs first-fit: {fr.nodes_used / ff[0]:.2f}×, leaves {fr.leaves_used / ff[1]:.2f}×; "
              f"free whole nodes left: {fr.free_whole_nodes}; idle GPUs on used nodes: {fr.idle_gpus_on_used_nodes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
