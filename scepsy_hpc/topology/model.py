"""The topology model: switch tree (and Slurm blocks) → nodes → NVLink domains → GPUs.

Parsers (one module per source) produce the parts — `GPULinks` for one node's GPUs, `Network` for
switches and blocks, `SlurmNode` for what Slurm says about a node — and `Topology` joins them into
what placement reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping


@dataclass(frozen=True)
class GPULinks:
    """What one node's GPUs report about each other: NVLink link counts per GPU pair.

    `nvlinks` maps (i, j) with i < j to the number of NVLink links between GPUs i and j (NV# in
    `nvidia-smi topo -m`, Links= in gres.conf); pairs without NVLink are absent.
    """

    n_gpus: int
    nvlinks: Mapping[tuple[int, int], int] = field(default_factory=dict)
    gpu_names: tuple[str, ...] = ()                              # model names, when the source gives them
    mig: Mapping[int, tuple[str, ...]] = field(default_factory=dict)  # GPU index → its MIG devices

    def pairs(self) -> list[tuple[int, int, int]]:
        """(i, j, links) for every NVLink-connected pair, sorted."""
        return sorted((i, j, n) for (i, j), n in self.nvlinks.items() if n > 0)

    def domains(self) -> list[list[int]]:
        """NVLink domains: the partition of the GPUs into maximal all-pairwise-linked groups."""
        return nvlink_domains(self.n_gpus, self.nvlinks)

    def components(self) -> list[list[int]]:
        """Connected components of the NVLink graph (differ from domains on hybrid cube meshes)."""
        parent = list(range(self.n_gpus))

        def root(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for (i, j), n in self.nvlinks.items():
            if n > 0:
                parent[root(i)] = root(j)
        groups: dict[int, list[int]] = {}
        for g in range(self.n_gpus):
            groups.setdefault(root(g), []).append(g)
        return sorted(groups.values())


def _cliques(adj: Mapping[int, set[int]], vertices: set[int]) -> Iterable[set[int]]:
    """Maximal cliques of the graph restricted to `vertices` (Bron–Kerbosch with pivoting)."""
    stack = [(set(), set(vertices), set())]
    while stack:
        r, p, x = stack.pop()
        if not p and not x:
            yield r
            continue
        pivot = max(p | x, key=lambda u: len(adj[u] & p))
        for v in sorted(p - adj[pivot]):
            stack.append((r | {v}, p & adj[v], x & adj[v]))
            p = p - {v}
            x = x | {v}


def nvlink_domains(n_gpus: int, nvlinks: Mapping[tuple[int, int], int]) -> list[list[int]]:
    """Partition GPUs 0..n-1 into NVLink domains: repeatedly take the largest all-pairwise-linked
    group of the GPUs left (ties: more links inside, then lower indices). On an NVSwitch board that
    is every GPU; on bridged PCIe boards the pairs; on a DGX-1 hybrid cube mesh the two quads."""
    adj: dict[int, set[int]] = {g: set() for g in range(n_gpus)}
    for (i, j), n in nvlinks.items():
        if n > 0 and i != j:
            adj[i].add(j)
            adj[j].add(i)
    left = set(range(n_gpus))
    out: list[list[int]] = []
    while left:
        def rank(c: set[int]) -> tuple[int, int, list[int]]:
            inside = sum(nvlinks.get((min(a, b), max(a, b)), 0) for a in c for b in c if a < b)
            return (-len(c), -inside, sorted(c))
        best = min(_cliques(adj, left), key=rank)
        out.append(sorted(best))
        left -= best
    return sorted(out)


@dataclass(frozen=True)
class Switch:
    """A network switch: leaf switches list nodes, upper ones list child switches."""

    name: str
    level: int | None = None          # as the source states it (topology.conf `Level=` is optional)
    nodes: tuple[str, ...] = ()
    children: tuple[str, ...] = ()


@dataclass(frozen=True)
class Block:
    """A Slurm topology/block block: nodes with a fast interconnect among them (e.g. an NVL72 rack)."""

    name: str
    nodes: tuple[str, ...]
    index: int | None = None
    size: int | None = None


@dataclass(frozen=True)
class Network:
    """Switches (tree form) and/or blocks (block form), in source order."""

    switches: Mapping[str, Switch] = field(default_factory=dict)
    blocks: Mapping[str, Block] = field(default_factory=dict)
    block_sizes: tuple[int, ...] = ()

    def derived_levels(self) -> dict[str, int]:
        """Level of every switch: 0 for a leaf, else 1 + the highest level among its children."""
        levels: dict[str, int] = {}

        def level(name: str, path: tuple[str, ...] = ()) -> int:
            if name in levels:
                return levels[name]
            sw = self.switches.get(name)
            kids = [c for c in (sw.children if sw else ()) if c in self.switches and c not in path]
            levels[name] = 0 if not kids else 1 + max(level(c, path + (name,)) for c in kids)
            return levels[name]

        for name in self.switches:
            level(name)
        return levels

    def leaf_of(self) -> dict[str, str]:
        """Node → its leaf group: the switch that lists it (tree), else its block."""
        out: dict[str, str] = {}
        for b in self.blocks.values():
            for n in b.nodes:
                out.setdefault(n, b.name)
        for sw in self.switches.values():
            for n in sw.nodes:
                out[n] = sw.name
        return out

    def as_json(self) -> dict:
        """The JSON form `scepsy topology show --json` prints."""
        out: dict = {}
        if self.switches:
            out["switches"] = {s.name: {"level": s.level, "nodes": list(s.nodes), "children": list(s.children)}
                               for s in self.switches.values()}
            out["derived_levels"] = self.derived_levels()
        if self.blocks:
            out["blocks"] = {b.name: list(b.nodes) for b in self.blocks.values()}
            out["block_sizes"] = list(self.block_sizes or sorted({b.size for b in self.blocks.values() if b.size}))
        return out


@dataclass(frozen=True)
class SlurmNode:
    """What `sinfo` / `scontrol show node` say about one node."""

    name: str
    gpus: int = 0                         # GPUs in its GRES
    gpu_type: str | None = None           # GRES type, e.g. "h100" or "nvidia_h100_80gb_hbm3"
    gpus_alloc: int = 0                   # GPUs already allocated to jobs (GresUsed / AllocTRES)
    state: str = "idle"                   # lower case, flags kept: "idle", "mixed", "down*", "drained"
    partitions: tuple[str, ...] = ()
    cpus: int = 0
    mem_mib: int = 0
    features: tuple[str, ...] = ()
    gpus_alloc_idx: tuple[int, ...] | None = None   # which ones, when GresUsed prints (IDX:…)

    @property
    def usable(self) -> bool:
        """Can take new jobs: not down, drained, draining, failing, in maintenance or not responding."""
        bad = ("down", "drain", "fail", "maint", "unknown", "future", "reserved", "inval", "power")
        return not any(b in self.state for b in bad) and not self.state.endswith("*")


@dataclass(frozen=True)
class Node:
    """A GPU node as placement sees it: GPUs of one type, NVLink domains, GPUs free for us."""

    name: str
    gpu_type: str
    gpu_mem_gib: float
    nvlink_domains: tuple[tuple[int, ...], ...]
    free_gpus: frozenset[int] | None = None    # None: every GPU is free
    leaf: str | None = None                    # leaf switch (or block) the node hangs off

    @property
    def n_gpus(self) -> int:
        """GPUs on the node."""
        return sum(len(d) for d in self.nvlink_domains)

    def free(self) -> list[list[int]]:
        """Free GPU indices per NVLink domain."""
        keep = self.free_gpus
        return [[g for g in d if keep is None or g in keep] for d in self.nvlink_domains]


@dataclass(frozen=True)
class Topology:
    """Nodes and the network above them: what placement works on."""

    nodes: tuple[Node, ...]
    network: Network = field(default_factory=Network)

    def node(self, name: str) -> Node:
        """The node called `name`."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def n_gpus(self) -> int:
        """GPUs on all nodes."""
        return sum(n.n_gpus for n in self.nodes)
