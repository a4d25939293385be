"""`scepsy topology show`: what a topology source says, as a tree or as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from scepsy_hpc.commands.common import jsonable, make_console, resolve_input
from scepsy_hpc.errors import SpecError


def add_arguments(sub: Any) -> None:
    """The `topology show` subcommand's arguments."""
    to = sub.add_parser("topology", help="show what a topology source says: switches, blocks, nodes, NVLink domains")
    tsub = to.add_subparsers(dest="topology_command", required=True, metavar="SUBCOMMAND")
    ts = tsub.add_parser("show", help="print the topology as a tree (or --json)")
    src = ts.add_mutually_exclusive_group(required=True)
    src.add_argument("--slurm", action="store_true", help="ask the live Slurm (scontrol show topology / node)")
    src.add_argument("--topology-conf", metavar="FILE", help="a topology.conf (tree or block), or topology.yaml (Slurm ≥ 25.05)")
    src.add_argument("--scontrol", metavar="FILE", help="saved `scontrol show topology` output")
    src.add_argument("--nvsmi", metavar="FILE", help="saved `nvidia-smi topo -m` output of one node")
    src.add_argument("--gres", metavar="FILE", help="gres.conf, or `slurmd -G` output (Links= per GPU)")
    src.add_argument("--nvml", action="store_true", help="probe this node's GPUs with NVML (needs nvidia-ml-py)")
    src.add_argument("--cluster", metavar="CLUSTER.yaml", help="a cluster spec's static description")
    ts.add_argument("--partition", metavar="P", help="with --slurm: only this partition's nodes")
    ts.add_argument("--json", action="store_true", help="print one JSON object")
    ts.set_defaults(run=run)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror})") from None


def links_json(links: Any) -> dict[str, Any]:
    """A node's GPUs: count, NVLink domains and components, per-pair link counts, names, MIG devices."""
    out: dict[str, Any] = {"gpus": links.n_gpus, "nvlink_domains": links.domains(),
                           "nvlink_components": links.components(), "nvlink_pairs": [list(p) for p in links.pairs()]}
    if links.gpu_names:
        out["gpu_names"] = list(links.gpu_names)
    if links.mig:
        out["mig"] = {str(g): list(devs) for g, devs in links.mig.items()}
    return out


def node_json(n: Any) -> dict[str, Any]:
    """A Slurm node as JSON."""
    return {"name": n.name, "gpus": n.gpus, "gpu_type": n.gpu_type, "gpus_alloc": n.gpus_alloc, "state": n.state,
            "usable": n.usable, "partitions": list(n.partitions)}


def gather(args: argparse.Namespace) -> dict[str, Any]:
    """Read the chosen source into the JSON form (keys depend on the source)."""
    name = next(k for k in ("nvsmi", "gres", "topology_conf", "scontrol", "slurm", "nvml", "cluster") if getattr(args, k))
    if name == "nvsmi":
        from scepsy_hpc.topology.nvsmi import parse_nvsmi

        return {"source": args.nvsmi, **links_json(parse_nvsmi(_read(args.nvsmi), Path(args.nvsmi).name))}
    if name == "nvml":
        from scepsy_hpc.topology.nvml import probe_nvml

        return {"source": "nvml", **links_json(probe_nvml())}
    if name == "gres":
        from scepsy_hpc.topology.gres import parse_gres

        nodes = parse_gres(_read(args.gres), Path(args.gres).name)
        return {"source": args.gres, "nodes": {n: {"type": g.type, **links_json(g.gpu_links())} for n, g in nodes.items()}}
    if name == "topology_conf":
        from scepsy_hpc.topology.slurmtopo import parse_topology_conf, parse_topology_yaml

        text, src = _read(args.topology_conf), Path(args.topology_conf).name
        if args.topology_conf.endswith((".yaml", ".yml")):
            tset = parse_topology_yaml(text, src)
            return {"source": args.topology_conf, "default": tset.default,
                    "topologies": {k: {"kind": tset.kinds.get(k), **net.as_json()} for k, net in tset.networks.items()},
                    **tset.cluster_default().as_json()}
        return {"source": args.topology_conf, **parse_topology_conf(text, src).as_json()}
    if name == "scontrol":
        from scepsy_hpc.topology.slurmtopo import parse_scontrol_topology

        return {"source": args.scontrol, **parse_scontrol_topology(_read(args.scontrol), Path(args.scontrol).name).as_json()}
    if name == "slurm":
        from scepsy_hpc.topology.discover import discover

        network, nodes = discover(partition=args.partition)
        return {"source": "slurm", **network.as_json(), "nodes": [node_json(n) for n in nodes]}
    from scepsy_hpc.spec.catalog import load_gpus
    from scepsy_hpc.spec.cluster import load_cluster
    from scepsy_hpc.topology.build import from_cluster

    gpus = load_gpus(args.gpu_catalog)
    topo = from_cluster(load_cluster(resolve_input(args.cluster, "clusters"), gpus), gpus)
    return {"source": args.cluster, **topo.network.as_json(),
            "nodes": [{"name": n.name, "gpu_type": n.gpu_type, "gpus": n.n_gpus, "leaf": n.leaf,
                       "nvlink_domains": [list(d) for d in n.nvlink_domains]} for n in topo.nodes]}


def _tree(d: dict[str, Any]) -> Any:
    from rich.tree import Tree

    root = Tree(f"[bold]{d['source']}[/bold]")
    if "switches" in d:
        sw, levels = d["switches"], d.get("derived_levels", {})
        children = {c for s in sw.values() for c in s["children"]}
        nodes_by_name = {n["name"]: n for n in d.get("nodes", [])}

        def add(branch: Any, name: str, depth: int = 0) -> None:
            s = sw.get(name, {"nodes": [], "children": []})
            b = branch.add(f"switch [cyan]{name}[/cyan] (level {levels.get(name, '?')})")
            for c in s["children"]:
                if depth < 32:
                    add(b, c, depth + 1)
            if s["nodes"]:
                b.add(", ".join(_node_label(n, nodes_by_name) for n in s["nodes"]))

        for name in sw:
            if name not in children:
                add(root, name)
        under = {n for s in sw.values() for n in s["nodes"]}
        loose = [n for n in nodes_by_name if n not in under]
        if loose:
            root.add("[dim]under no switch:[/dim] " + ", ".join(_node_label(n, nodes_by_name) for n in loose))
    if "blocks" in d:
        for b, nodes in d["blocks"].items():
            root.add(f"block [cyan]{b}[/cyan] ({len(nodes)} nodes): {_compress(nodes)}")
    if "gpus" in d and "nvlink_domains" in d:
        _gpus_branch(root, d)
    if "nodes" in d and isinstance(d["nodes"], dict):
        for n, g in d["nodes"].items():
            _gpus_branch(root.add(f"node [cyan]{n}[/cyan] ({g.get('type') or 'gpu'})"), g)
    if "nodes" in d and isinstance(d["nodes"], list) and "switches" not in d:
        for n in d["nodes"]:
            root.add(_node_line(n))
    return root


def _node_label(name: str, nodes: dict[str, Any]) -> str:
    n = nodes.get(name)
    if n is None:
        return name
    if "state" not in n:   # a cluster spec's node
        return f"{name} ({n['gpus']}× {n['gpu_type']}, NVLink {n['nvlink_domains']})"
    kind = f" {n['gpu_type']}" if n.get("gpu_type") else ""
    return f"{name} ({n['gpus']} GPU{'' if n['gpus'] == 1 else 's'}{kind}, {n['state']})"


def _node_line(n: dict[str, Any]) -> str:
    if "nvlink_domains" in n:
        return f"{n['name']}: {n['gpus']}× {n['gpu_type']}, NVLink domains {n['nvlink_domains']}, leaf {n.get('leaf')}"
    return (f"{n['name']}: {n['gpus']} GPU(s) {n.get('gpu_type') or ''}, {n['gpus_alloc']} allocated, {n['state']}"
            f"{'' if n['usable'] else ' (not usable)'}, partitions {','.join(n['partitions'])}")


def _gpus_branch(branch: Any, g: dict[str, Any]) -> None:
    pairs = {(i, j): n for i, j, n in g["nvlink_pairs"]}
    for dom in g["nvlink_domains"]:
        links = sorted({pairs.get((a, b), 0) for a in dom for b in dom if a < b})
        kind = "no NVLink" if len(dom) == 1 else f"NVLink ×{'/'.join(map(str, links))} each pair"
        branch.add(f"NVLink domain GPUs {dom} ({kind})")
    if g["nvlink_components"] != g["nvlink_domains"]:
        branch.add(f"[dim]NVLink also links across domains: connected groups {g['nvlink_components']}[/dim]")
    for gpu, devs in g.get("mig", {}).items():
        branch.add(f"GPU {gpu} MIG: {', '.join(devs)}")


def _compress(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:3])}, … {names[-1]}"


def run(args: argparse.Namespace) -> int:
    """Show a topology source (`scepsy topology show`)."""
    d = gather(args)
    if args.json:
        print(json.dumps(jsonable(d), indent=2))
    else:
        make_console().print(_tree(d))
    return 0
