"""Cluster spec (DESIGN.md §3.3): Slurm settings to discover from, and/or a static description."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from scepsy_hpc.spec.base import SpecModel
from scepsy_hpc.spec.catalog import GPUSpec
from scepsy_hpc.spec.hostlist import expand_hostlist
from scepsy_hpc.spec.source import SourceMap, format_loc, load_yaml, parse_document, suggest
from scepsy_hpc.spec.workflow_bounds import NAME, NAME_RULE


# what `backend.templates` lets through into `#SBATCH --constraint`
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.&|\[\]()*-]+")


class SlurmSettings(SpecModel):
    """Where and how to ask Slurm for GPUs; nodes and switches are then discovered."""

    partition: str
    account: str | None = None
    qos: str | None = None
    time: Annotated[str, Field(pattern=r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")] = "4:00:00"
    constraint: str | None = None
    # GRES GPU type (as `scontrol show node` prints it) → GPU catalog name, e.g. {h100: h100-sxm};
    # unmapped types are matched to the catalog by name (see topology.build.catalog_type)
    gpu_types: dict[str, str] = {}
    # NVLink domains of discovered nodes until a probe job measured them: all (NVSwitch), pairs, none
    nvlink: Literal["all", "pairs", "none"] = "all"


class NodeGroup(SpecModel):
    """Identical GPU nodes: `nvlink` says which GPUs of a node share an NVLink domain."""

    name: str
    nodes: str  # hostlist expression
    gpu_type: str
    gpus_per_node: Annotated[int, Field(ge=1, le=72)]
    nvlink: Union[Literal["all", "pairs", "none"], list[list[int]]] = "all"

    @field_validator("nodes")
    @classmethod
    def _hostlist(cls, v: str) -> str:
        expand_hostlist(v)  # raises ValueError with the reason
        return v

    @model_validator(mode="after")
    def _domains(self) -> "NodeGroup":
        if self.nvlink == "pairs" and self.gpus_per_node % 2:
            raise ValueError(f"nvlink: pairs needs an even gpus_per_node, got {self.gpus_per_node}")
        if isinstance(self.nvlink, list):
            seen: set[int] = set()
            for group in self.nvlink:
                for g in group:
                    if not 0 <= g < self.gpus_per_node:
                        raise ValueError(f"nvlink GPU index {g} is outside 0..{self.gpus_per_node - 1}")
                    if g in seen:
                        raise ValueError(f"GPU {g} appears in two NVLink domains")
                    seen.add(g)
        return self

    def host_names(self) -> list[str]:
        """The node names of this group."""
        return expand_hostlist(self.nodes)

    def nvlink_domains(self) -> list[list[int]]:
        """GPU index groups that are NVLink-connected (singletons where there is no NVLink)."""
        n = self.gpus_per_node
        if self.nvlink == "all":
            return [list(range(n))]
        if self.nvlink == "pairs":
            return [[i, i + 1] for i in range(0, n, 2)]
        if self.nvlink == "none":
            return [[i] for i in range(n)]
        covered = {g for group in self.nvlink for g in group}
        return [list(g) for g in self.nvlink] + [[i] for i in range(n) if i not in covered]


class SwitchSpec(SpecModel):
    """A network switch: a leaf lists `nodes`, a parent lists `switches` (hostlist expressions)."""

    name: str
    nodes: str | None = None
    switches: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "SwitchSpec":
        if (self.nodes is None) == (self.switches is None):
            raise ValueError(f"switch {self.name!r} needs exactly one of nodes: or switches:")
        expand_hostlist(self.nodes or self.switches or "")
        return self


class ClusterSpec(SpecModel):
    """A cluster: Slurm settings, a static description (planning offline, simulation), or both."""

    name: str
    description: str = ""
    slurm: SlurmSettings | None = None
    node_groups: list[NodeGroup] = []
    switches: list[SwitchSpec] = []

    @model_validator(mode="after")
    def _something(self) -> "ClusterSpec":
        if self.slurm is None and not self.node_groups:
            raise ValueError("a cluster spec needs slurm: (to discover nodes) or node_groups: (a static description)")
        return self

    def gpu_counts(self) -> dict[str, int]:
        """GPUs per GPU type in the static description."""
        out: dict[str, int] = {}
        for g in self.node_groups:
            out[g.gpu_type] = out.get(g.gpu_type, 0) + g.gpus_per_node * len(g.host_names())
        return out


def _check_names(spec: ClusterSpec, smap: SourceMap) -> list[str]:
    """Names that reach sbatch or a job script (partition, account, qos, GRES types, node and switch
    names) use only letters, digits, '.', '_' and '-': `gpu;id` is refused here, not at submission."""
    problems: list[str] = []

    def check(value: str | None, loc: tuple[Any, ...], what: str) -> None:
        if value is not None and not NAME.fullmatch(value):
            problems.append(f"{smap.where(loc)}: {format_loc(loc)}: {what} {value!r} cannot be passed to Slurm safely; "
                            f"use {NAME_RULE}")

    if spec.slurm is not None:
        for key in ("partition", "account", "qos"):
            check(getattr(spec.slurm, key), ("slurm", key), key)
        for gres in spec.slurm.gpu_types:
            check(gres, ("slurm", "gpu_types"), "GRES type")
        if spec.slurm.constraint is not None and not _CONSTRAINT.fullmatch(spec.slurm.constraint):
            problems.append(f"{smap.where(('slurm', 'constraint'))}: slurm.constraint: {spec.slurm.constraint!r} "
                            f"cannot be passed to Slurm safely; use feature names joined by & | ( ) [ ] *")
    for i, group in enumerate(spec.node_groups):
        check(group.name, ("node_groups", i, "name"), "node group name")
        bad = next((h for h in group.host_names() if not NAME.fullmatch(h)), None)
        if bad is not None:
            check(bad, ("node_groups", i, "nodes"), "node name")
    for i, sw in enumerate(spec.switches):
        check(sw.name, ("switches", i, "name"), "switch name")
    return problems


def _switch_cycle(spec: ClusterSpec) -> list[str] | None:
    """A cycle of switches each listing the next under `switches:`, or None."""
    children = {sw.name: expand_hostlist(sw.switches) for sw in spec.switches if sw.switches}
    state: dict[str, int] = {}
    for root in children:
        stack = [(root, iter(children.get(root, ())))]
        path = [root]
        if state.get(root):
            continue
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(children.get(nxt, ()))))
                path.append(nxt)
    return None


def check_cluster(spec: ClusterSpec, smap: SourceMap, gpus: dict[str, GPUSpec]) -> list[str]:
    """Cross-reference problems: names, GPU types, duplicate nodes, switch references and cycles."""
    problems = _check_names(spec, smap)
    owner: dict[str, int] = {}
    for i, group in enumerate(spec.node_groups):
        if group.gpu_type not in gpus:
            problems.append(f"{smap.where(('node_groups', i, 'gpu_type'))}: node_groups[{i}].gpu_type: unknown GPU type "
                            f"{group.gpu_type!r}; {suggest(group.gpu_type, gpus)}")
        for host in group.host_names():
            if host in owner:
                problems.append(f"{smap.where(('node_groups', i, 'nodes'))}: node_groups[{i}].nodes: node {host!r} is already "
                                f"in node_groups[{owner[host]}]")
            owner[host] = i
    names = [s.name for s in spec.switches]
    leaf_of: dict[str, str] = {}
    for i, sw in enumerate(spec.switches):
        if names.count(sw.name) > 1 and names.index(sw.name) != i:
            problems.append(f"{smap.where(('switches', i, 'name'))}: switches[{i}].name: duplicate switch name {sw.name!r}")
        if sw.nodes:
            for host in expand_hostlist(sw.nodes):
                if spec.node_groups and host not in owner:
                    problems.append(f"{smap.where(('switches', i, 'nodes'))}: switches[{i}].nodes: node {host!r} is in no "
                                    f"node group; {suggest(host, owner)}")
                if host in leaf_of:
                    problems.append(f"{smap.where(('switches', i, 'nodes'))}: switches[{i}].nodes: node {host!r} is already "
                                    f"under leaf switch {leaf_of[host]!r}")
                leaf_of[host] = sw.name
        else:
            for child in expand_hostlist(sw.switches or ""):
                if child not in names:
                    problems.append(f"{smap.where(('switches', i, 'switches'))}: switches[{i}].switches: unknown switch "
                                    f"{child!r}; {suggest(child, names)}")
    cycle = _switch_cycle(spec)
    if cycle:
        i = names.index(cycle[0])
        problems.append(f"{smap.where(('switches', i, 'switches'))}: switches[{i}].switches: switches form a cycle "
                        f"({' -> '.join(cycle)}); a switch tree has each switch under at most one parent, never itself")
    return problems


def parse_cluster(data: Any, smap: SourceMap, gpus: dict[str, GPUSpec]) -> ClusterSpec:
    """Validate parsed YAML as a cluster spec."""
    return parse_document(ClusterSpec, data, smap, "a cluster spec is a mapping with keys name, slurm and/or node_groups, switches",
                          lambda spec: check_cluster(spec, smap, gpus))


def load_cluster(path: str | Path, gpus: dict[str, GPUSpec]) -> ClusterSpec:
    """Load and validate a cluster spec file."""
    data, smap = load_yaml(path)
    return parse_cluster(data, smap, gpus)
