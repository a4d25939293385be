"""Asking a live Slurm for its topology: `scontrol show topology`, `scontrol show node`.

The command runner is passed in (a function from argv to stdout), so the Slurm backend and the
tests supply their own; `run_command` is the plain subprocess one, translating failures into
`SlurmError` at this boundary.
"""

from __future__ import annotations

import subprocess
from typing import Callable, Sequence

from scepsy_hpc.errors import SlurmError
from scepsy_hpc.topology.model import Network, SlurmNode

Runner = Callable[[Sequence[str]], str]


def run_command(argv: Sequence[str], timeout_s: float = 30.0) -> str:
    """Run a Slurm command and return its stdout; SlurmError names the command and its stderr."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise SlurmError(f"`{argv[0]}` is not installed here: run on a Slurm login node, or give the topology as a file "
                         f"(--topology-conf, --scontrol)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(argv)}` did not answer within {timeout_s:g} s; is slurmctld up?") from None
    if done.returncode != 0:
        raise SlurmError(f"`{' '.join(argv)}` failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def discover(run: Runner = run_command, partition: str | None = None) -> tuple[Network, list[SlurmNode]]:
    """The network (switches or blocks; empty when Slurm has no topology plugin) and the nodes."""
    from scepsy_hpc.topology.slurmnodes import parse_scontrol_nodes
    from scepsy_hpc.topology.slurmtopo import parse_scontrol_topology

    try:
        topo_text = run(["scontrol", "show", "topology"])
    except SlurmError as exc:
        # topology/flat (the default) answers with an error rather than an empty list
        if "no topology" not in str(exc).lower() and "not configured" not in str(exc).lower():
            raise
        topo_text = ""
    network = parse_scontrol_topology(topo_text, "scontrol show topology") if topo_text.strip() else Network()
    argv = ["scontrol", "show", "node", "--oneliner"]
    nodes = parse_scontrol_nodes(run(argv), "scontrol show node")
    if partition:
        nodes = [n for n in nodes if partition in n.partitions]
    return network, nodes
