"""Joining the parts into a `Topology`: from a static cluster spec, or from what Slurm reports."""

from __future__ import annotations

from typing import Mapping, Sequence

from scepsy_hpc.errors import TopologyError
from scepsy_hpc.spec.catalog import GPUSpec
from scepsy_hpc.spec.cluster import ClusterSpec
from scepsy_hpc.spec.hostlist import expand_hostlist
from scepsy_hpc.topology.model import GPULinks, Network, Node, SlurmNode, Switch, Topology


def network_of_cluster(spec: ClusterSpec) -> Network:
    """The switch tree a cluster spec's `switches:` describe."""
    switches = {}
    for sw in spec.switches:
        switches[sw.name] = Switch(sw.name, None, tuple(expand_hostlist(sw.nodes)) if sw.nodes else (),
                                   tuple(expand_hostlist(sw.switches)) if sw.switches else ())
    return Network(switches=switches)


def from_cluster(spec: ClusterSpec, gpus: Mapping[str, GPUSpec]) -> Topology:
    """The topology of a cluster spec's static description (node groups and switches)."""
    if not spec.node_groups:
        raise TopologyError(f"cluster {spec.name!r} has no node_groups: to place offline; describe its nodes, "
                            f"or discover them from Slurm (scepsy topology show --slurm)")
    net = network_of_cluster(spec)
    leaf = net.leaf_of()
    nodes = []
    for group in spec.node_groups:
        mem = gpus[group.gpu_type].mem_gib if group.gpu_type in gpus else 0.0
        domains = tuple(tuple(d) for d in group.nvlink_domains())
        for host in group.host_names():
            nodes.append(Node(host, group.gpu_type, mem, domains, None, leaf.get(host)))
    return Topology(tuple(nodes), net)


def catalog_type(gres_type: str | None, catalog: Mapping[str, GPUSpec], explicit: Mapping[str, str] | None = None) -> str:
    """The GPU catalog name of a GRES type: `explicit` first, then the catalog name itself, then the
    one catalog name that starts with it once vendor prefixes and memory suffixes are dropped
    (`nvidia_h100_80gb_hbm3` → h100 → h100-sxm when that is the only h100 in the catalog)."""
    import re

    raw = (gres_type or "").strip()
    if explicit and raw in explicit:
        return explicit[raw]
    if raw in catalog:
        return raw
    key = re.sub(r"^(nvidia|tesla|geforce)[_-]", "", raw.lower())
    stem = re.split(r"[_-]", key)[0] if key else ""
    matches = [name for name in catalog if stem and (name == key or name.split("-")[0] == stem)]
    if len(matches) == 1:
        return matches[0]
    hint = f"it could be {' or '.join(matches)}" if matches else f"the catalog has {', '.join(sorted(catalog))}"
    raise TopologyError(f"Slurm GPU type {raw or '(none)'!r} has no GPU catalog entry; {hint}. "
                        f"Map it in the cluster spec: slurm: {{gpu_types: {{{raw or 'gpu'}: <catalog name>}}}}")


def from_slurm(slurm_nodes: Sequence[SlurmNode], network: Network, gpu_type: str, gpu_mem_gib: float, *,
               links: Mapping[str, GPULinks] | None = None, partition: str | None = None,
               default_nvlink: str = "all") -> Topology:
    """The topology of live Slurm nodes: usable nodes with GPUs (in `partition` when given), their
    free GPUs, NVLink domains from probed `links` per node (or `default_nvlink`: all, pairs, none)."""
    leaf = network.leaf_of()
    nodes = []
    for sn in slurm_nodes:
        if sn.gpus <= 0 or not sn.usable or (partition and partition not in sn.partitions):
            continue
        if links and sn.name in links:
            domains = tuple(tuple(d) for d in links[sn.name].domains())
        elif default_nvlink == "pairs":
            domains = tuple((i, i + 1) if i + 1 < sn.gpus else (i,) for i in range(0, sn.gpus, 2))
        elif default_nvlink == "none":
            domains = tuple((i,) for i in range(sn.gpus))
        else:
            domains = (tuple(range(sn.gpus)),)
        if sn.gpus_alloc_idx is not None:
            free = frozenset(range(sn.gpus)) - frozenset(sn.gpus_alloc_idx) if sn.gpus_alloc_idx else None
        else:
            # only a count (AllocTRES, sinfo): the free ones are taken to be the last
            free = frozenset(range(sn.gpus_alloc, sn.gpus)) if sn.gpus_alloc else None
        nodes.append(Node(sn.name, gpu_type, gpu_mem_gib, domains, free, leaf.get(sn.name)))
    return Topology(tuple(nodes), network)
