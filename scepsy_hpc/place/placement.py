"""Hierarchical, fragmentation-aware placement: an allocation and a topology → a `Placement`.

Every instance gets a node, GPU indices, a memory fraction, an MPS thread percentage and a port.
Rules: a tensor-parallel group sits inside one NVLink domain of one node; fractional instances share
GPUs with Σ gpu_frac ≤ 1 (so Σ memory ≤ the GPU's); no GPU is used twice; only GPUs of the plan's
type that are free are used. Objective, in this order: fewest nodes, fewest leaf switches (or
blocks), fewest partially-used GPUs.

How: the fewest nodes k that could hold the GPUs needed is a lower bound; for k upward, candidate
node sets (every k-subset on small clusters, ranked by leaf switches; on large ones the k roomiest
nodes under the fewest leaves) are packed — tensor-parallel groups largest first into the
best-fitting NVLink domain, whole single GPUs next, then fractions best-fit decreasing onto GPUs
already shared. On small clusters where this needs more nodes than the bound, the exact MILP of
`place.exact` decides.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from scepsy_hpc.errors import InfeasibleError
from scepsy_hpc.spec.fractions import EPS as _EPS, fraction_bins, gpus_for_fractions
from scepsy_hpc.spec.placement_entry import BASE_PORT, PlacementEntry, default_mem_frac, default_mps_pct
from scepsy_hpc.spec.plan import Entry, iter_instances
from scepsy_hpc.topology.model import Node, Topology

EXHAUSTIVE_NODES = 10   # up to this many eligible nodes, every k-subset is tried
EXACT_NODES = 8         # up to this many, the exact MILP settles what the heuristic cannot


@dataclass(frozen=True)
class Want:
    """One instance to place."""

    llm: str
    replica: int
    tp: int
    gpu_frac: float

    @property
    def shape(self) -> str:
        """'tp=4' or 'gpu_frac=0.25'."""
        return f"tp={self.tp}" if self.gpu_frac >= 1.0 else f"gpu_frac={self.gpu_frac:g}"


@dataclass(frozen=True)
class PlacedInstance:
    """An instance on concrete GPUs."""

    llm: str
    replica: int
    node: str
    gpus: tuple[int, ...]
    gpu_frac: float
    mem_frac: float       # --gpu-memory-utilization (vLLM) / --mem-fraction-static (SGLang)
    mps_pct: int          # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; 100 for a whole-GPU instance
    port: int

    def entry(self) -> PlacementEntry:
        """The plan file's entry for this instance."""
        return PlacementEntry(llm=self.llm, replica=self.replica, node=self.node, gpus=list(self.gpus),
                              gpu_frac=self.gpu_frac, mem_frac=round(self.mem_frac, 4), mps_pct=self.mps_pct, port=self.port)

    def as_dict(self) -> dict[str, Any]:
        """The plan file / JSON form."""
        return self.entry().model_dump()


@dataclass(frozen=True)
class Fragmentation:
    """How tightly a placement packs."""

    nodes_used: int
    nodes_min: int            # lower bound: fewest eligible nodes whose free GPUs hold the GPUs needed
    leaves_used: int
    leaves_min: int           # lower bound: fewest leaf switches whose nodes hold them
    gpus_used: int
    partial_gpus: int         # GPUs shared by fractional instances whose fractions sum below 1
    idle_gpus_on_used_nodes: int
    free_whole_nodes: int     # eligible nodes left entirely free

    def as_dict(self) -> dict[str, int]:
        """JSON form."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class Placement:
    """Every instance of an allocation on concrete GPUs, and how well it packs."""

    instances: tuple[PlacedInstance, ...]
    fragmentation: Fragmentation
    solve_time_s: float
    method: str               # "heuristic" or "exact"

    def nodes(self) -> list[str]:
        """Nodes used, in first-use order."""
        return list(dict.fromkeys(i.node for i in self.instances))

    def as_list(self) -> list[dict[str, Any]]:
        """The plan file's `placement:` list."""
        return [i.as_dict() for i in self.instances]

    def entries(self) -> list[PlacementEntry]:
        """The plan's `placement` entries."""
        return [i.entry() for i in self.instances]


class PlacementError(InfeasibleError):
    """An instance could not be placed; says which and why. `placed_of_shape`: for a tp-t group, the
    groups of t GPUs (larger groups counted as several) that did fit; for a fraction, those placed."""

    def __init__(self, message: str, want: Want | None = None, placed_of_shape: int = 0) -> None:
        super().__init__(message)
        self.want = want
        self.placed_of_shape = placed_of_shape


def wants_of(allocation: Mapping[str, Entry]) -> list[Want]:
    """The instances of an allocation, LLM by LLM (a mixed group's replicas each with their configuration)."""
    return [Want(llm, r, a.tp, a.gpu_frac) for llm, r, a in iter_instances(allocation)]


def eligible_nodes(topo: Topology, gpu_type: str | None) -> list[Node]:
    """Nodes with GPUs of the plan's type, at least one free."""
    return [n for n in topo.nodes if (gpu_type is None or n.gpu_type == gpu_type) and any(n.free())]


def _gpus_needed(wants: Sequence[Want]) -> int:
    fracs = [w.gpu_frac for w in wants if w.gpu_frac < 1.0]
    return sum(w.tp for w in wants if w.gpu_frac >= 1.0) + gpus_for_fractions(fracs)


def _cap(node: Node) -> int:
    return sum(len(d) for d in node.free())


def _lower_bounds(nodes: Sequence[Node], need: int) -> tuple[int, int]:
    """Fewest nodes, fewest leaves whose free GPUs reach `need` (capacity bounds only)."""
    caps = sorted((_cap(n) for n in nodes), reverse=True)
    total, k = 0, 0
    while total < need and k < len(caps):
        total += caps[k]
        k += 1
    per_leaf: dict[Any, int] = {}
    for n in nodes:
        key = n.leaf if n.leaf is not None else ("node", n.name)
        per_leaf[key] = per_leaf.get(key, 0) + _cap(n)
    total, leaves = 0, 0
    for c in sorted(per_leaf.values(), reverse=True):
        if total >= need:
            break
        total += c
        leaves += 1
    return k, leaves


def _leaf(n: Node) -> Any:
    return n.leaf if n.leaf is not None else ("node", n.name)


def _pack(nodes: Sequence[Node], wants: Sequence[Want]) -> tuple[list[tuple[Want, int, tuple[int, ...]]] | None, Want | None, int]:
    """Pack `wants` onto `nodes`: ([(want, node index, gpus)], None, 0), or (None, the want that
    failed, how many of its shape were placed before it)."""
    free = [[list(d) for d in n.free()] for n in nodes]
    out: list[tuple[Want, int, tuple[int, ...]]] = []
    groups = sorted((w for w in wants if w.gpu_frac >= 1.0), key=lambda w: -w.tp)
    for w in groups:
        best = min(((len(d), ni, di) for ni, doms in enumerate(free) for di, d in enumerate(doms) if len(d) >= w.tp),
                   default=None)
        if best is None:
            # groups are placed largest first: all placed so far are at least as large as w
            return None, w, sum(p.tp // w.tp for p, _, _ in out)
        _, ni, di = best
        take, free[ni][di] = free[ni][di][:w.tp], free[ni][di][w.tp:]
        out.append((w, ni, tuple(take)))
    fr = [w for w in wants if w.gpu_frac < 1.0]
    # The one packer decides which instances share a GPU; here each shared GPU, when its first
    # (largest) instance comes, takes a free GPU from the smallest free domain.
    bin_of = {i: b for b, members in enumerate(fraction_bins([w.gpu_frac for w in fr])) for i in members}
    shared: list[tuple[int, int]] = []     # per shared GPU: (node index, gpu)
    for i in sorted(range(len(fr)), key=lambda i: -fr[i].gpu_frac):
        w, b = fr[i], bin_of[i]
        if b == len(shared):
            opened = min(((len(d), ni, di) for ni, doms in enumerate(free) for di, d in enumerate(doms) if d),
                         default=None)
            if opened is None:
                return None, w, sum(1 for p, _, _ in out if p.gpu_frac == w.gpu_frac)
            _, ni, di = opened
            shared.append((ni, free[ni][di].pop(0)))
        ni, g = shared[b]
        out.append((w, ni, (g,)))
    return out, None, 0


def _candidate_sets(nodes: Sequence[Node], k: int, need: int) -> list[list[int]]:
    """Node index sets of size k to try, best first (fewest leaves, most room)."""
    if len(nodes) <= EXHAUSTIVE_NODES:
        combos = [list(c) for c in itertools.combinations(range(len(nodes)), k)
                  if sum(_cap(nodes[i]) for i in c) >= need]
        combos.sort(key=lambda c: (len({_leaf(nodes[i]) for i in c}), -sum(_cap(nodes[i]) for i in c), c))
        return combos
    by_leaf: dict[Any, list[int]] = {}
    for i, n in enumerate(nodes):
        by_leaf.setdefault(_leaf(n), []).append(i)
    for members in by_leaf.values():
        members.sort(key=lambda i: (-_cap(nodes[i]), i))
    out: list[list[int]] = []
    # leaves roomiest first (the fewest that reach the need), their roomiest nodes
    leaves = sorted(by_leaf, key=lambda lf: -sum(_cap(nodes[i]) for i in by_leaf[lf][:k]))
    picked: list[int] = []
    for lf in leaves:
        picked += by_leaf[lf]
        top = sorted(picked, key=lambda i: (-_cap(nodes[i]), i))[:k]
        if len(top) == k and sum(_cap(nodes[i]) for i in top) >= need:
            out.append(top)
            break
    best = sorted(range(len(nodes)), key=lambda i: (-_cap(nodes[i]), i))[:k]
    if len(best) == k and best not in out:
        out.append(best)
    return out


def _instances(nodes: Sequence[Node], packed: Sequence[tuple[Want, int, tuple[int, ...]]],
               base_port: int, wants: Sequence[Want]) -> tuple[PlacedInstance, ...]:
    rank = {(w.llm, w.replica): i for i, w in enumerate(wants)}
    next_port: dict[str, int] = {}
    placed = []
    for w, ni, gpus in sorted(packed, key=lambda p: rank[p[0].llm, p[0].replica]):
        name = nodes[ni].name
        port = next_port.get(name, base_port)   # unique per node: co-located engines never collide
        next_port[name] = port + 1
        placed.append(PlacedInstance(w.llm, w.replica, name, gpus, w.gpu_frac, default_mem_frac(w.gpu_frac),
                                     default_mps_pct(w.gpu_frac), port))
    return tuple(placed)


def fragmentation(topo: Topology, placed: Sequence[PlacedInstance], eligible: Sequence[Node],
                  need: int) -> Fragmentation:
    """Nodes and leaves used against their lower bounds, partial and idle GPUs, whole nodes left free."""
    used_nodes = {p.node for p in placed}
    by_name = {n.name: n for n in topo.nodes}
    share: dict[tuple[str, int], float] = {}
    for p in placed:
        for g in p.gpus:
            share[p.node, g] = share.get((p.node, g), 0.0) + p.gpu_frac
    nodes_min, leaves_min = _lower_bounds(eligible, need)
    idle = sum(_cap(by_name[n]) for n in used_nodes) - len(share)
    untouched = [n for n in eligible if n.name not in used_nodes and _cap(n) == n.n_gpus]
    return Fragmentation(len(used_nodes), nodes_min, len({_leaf(by_name[n]) for n in used_nodes}), leaves_min,
                         len(share), sum(1 for v in share.values() if v < 1.0 - _EPS), idle, len(untouched))


def _no_room(w: Want, nodes: Sequence[Node], placed_of_shape: int) -> PlacementError:
    if w.gpu_frac >= 1.0:
        biggest = max((len(d) for n in nodes for d in n.free()), default=0)
        why = (f"the largest free NVLink domain has {biggest} GPU(s)" if biggest < w.tp else
               f"only {placed_of_shape} group(s) of {w.tp} GPUs inside one NVLink domain fit beside the rest")
        return PlacementError(f"cannot place LLM {w.llm!r} replica {w.replica} ({w.shape}): {why}; "
                              f"lower its tp or add nodes", w, placed_of_shape)
    return PlacementError(f"cannot place LLM {w.llm!r} replica {w.replica} ({w.shape}): no GPU has "
                          f"{w.gpu_frac:g} of its share left and no GPU is free", w, placed_of_shape)


def place(allocation: Mapping[str, Entry], topo: Topology, *, gpu_type: str | None = None,
          base_port: int = BASE_PORT, exact: bool = True) -> Placement:
    """Place every instance of `allocation` on `topo` (see the module docstring)."""
    t0 = time.perf_counter()
    wants = wants_of(allocation)
    nodes = eligible_nodes(topo, gpu_type)
    kind = f" {gpu_type}" if gpu_type else ""
    if not nodes:
        raise PlacementError(f"the topology has no node with free{kind} GPUs "
                             f"(types there: {', '.join(sorted({n.gpu_type for n in topo.nodes})) or 'none'})")
    need = _gpus_needed(wants)
    have = sum(_cap(n) for n in nodes)
    if need > have:
        raise PlacementError(f"the allocation needs {need} GPUs; the topology has {have} free{kind} GPUs on "
                             f"{len(nodes)} node(s)")
    for w in wants:
        if w.gpu_frac >= 1.0 and not any(len(d) >= w.tp for n in nodes for d in n.free()):
            raise _no_room(w, nodes, 0)
    k_min, _ = _lower_bounds(nodes, need)
    last: tuple[Want, int] | None = None
    for k in range(k_min, len(nodes) + 1):
        for subset in _candidate_sets(nodes, k, need):
            chosen = [nodes[i] for i in subset]
            packed, failed, n_ok = _pack(chosen, wants)
            if packed is None:
                last = (failed, n_ok) if last is None or n_ok > last[1] else last
                continue
            method = "heuristic"
            if exact and k > k_min and len(nodes) <= EXACT_NODES:
                from scepsy_hpc.place.exact import place_exact

                better = place_exact(wants, nodes, max_nodes=k - 1)
                if better is not None:
                    chosen, packed, method = better[0], better[1], "exact"
            placed = _instances(chosen, packed, base_port, wants)
            return Placement(placed, fragmentation(topo, placed, nodes, need), time.perf_counter() - t0, method)
    if exact and len(nodes) <= EXACT_NODES:
        from scepsy_hpc.place.exact import place_exact

        found = place_exact(wants, nodes, max_nodes=len(nodes))
        if found is not None:
            placed = _instances(found[0], found[1], base_port, wants)
            return Placement(placed, fragmentation(topo, placed, nodes, need), time.perf_counter() - t0, "exact")
    assert last is not None
    raise _no_room(last[0], nodes, last[1])


def domain_caps(topo: Topology, gpu_type: str | None, max_tp: int = 16) -> dict[int, int]:
    """K_t for the allocation MILP's constraint (6): disjoint tp-t groups the free NVLink domains hold."""
    doms = [len(d) for n in eligible_nodes(topo, gpu_type) for d in n.free() if d]
    return {t: sum(s // t for s in doms) for t in (1, 2, 4, 8, 16) if t <= max_tp}


def largest_domain(topo: Topology, gpu_type: str | None) -> int:
    """GPUs in the largest free NVLink domain (the tp cap)."""
    return max((len(d) for n in eligible_nodes(topo, gpu_type) for d in n.free()), default=0)


def lower_bound_nodes(allocation: Mapping[str, Entry], topo: Topology, gpu_type: str | None = None) -> int:
    """Fewest nodes any placement of `allocation` could use (capacity bound)."""
    return _lower_bounds(eligible_nodes(topo, gpu_type), _gpus_needed(wants_of(allocation)))[0]


__all__ = ["Placement", "PlacedInstance", "PlacementError", "Fragmentation", "Want", "place", "wants_of",
           "domain_caps", "largest_domain", "lower_bound_nodes"]
