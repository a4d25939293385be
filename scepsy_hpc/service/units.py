"""A deployment served by several jobs: one per node of its plan (a *unit*), and their replacements.

A plan's placement names nodes; the daemon submits one job per node, so that a node can be replaced
on its own (a walltime cut-over, a lost node, a cluster without room for two copies) while the other
nodes serve on. A job may run its unit on another node than the plan named (a free node at cut-over
time, or one that replaces a failed node): its own serve.json maps the unit's engines onto that node.

    <deployment dir>/serve.json                the whole placement (the *shape*), from the plan
    <deployment dir>/jobs/<job name>/          one job's session directory: serve.json (its unit's
                                               engines on its node), agents/, logs/

`choose_node` picks the node for a unit from what the backend says of its nodes (usable, not
excluded, enough GPUs free), `Lead` is how long before a job's end its replacement must be asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from scepsy_hpc.backend.records import ServeConfig
from scepsy_hpc.topology.model import SlurmNode

DEFAULT_HEALTHY_S = 60.0        # time from a job's start to healthy engines, until one was measured
DEFAULT_QUEUE_S = {"slurm": 30.0, "local": 0.0}   # queue wait, until one was measured


def units(shape: ServeConfig) -> list[str]:
    """The plan's nodes, each one unit (one job)."""
    return sorted({i.node for i in shape.instances})


def unit_config(shape: ServeConfig, unit: str, node: str) -> ServeConfig:
    """The engines of `unit` moved onto `node` (the same GPU indices, ports and launch fields)."""
    instances = [i.model_copy(update={"node": node}) for i in shape.instances if i.node == unit]
    if not instances:
        raise ValueError(f"the placement has no engine on node {unit!r}")
    return shape.model_copy(update={"instances": instances})


def gpus_needed(shape: ServeConfig, unit: str) -> int:
    """The GPUs the unit's engines use on their node."""
    return len({g for i in shape.instances if i.node == unit for g in i.gpus})


def llms_of(shape: ServeConfig, unit: str | None = None) -> dict[str, int]:
    """Engines per LLM (of one unit, or of the whole placement): the capacity the plan asks for."""
    out: dict[str, int] = {}
    for i in shape.instances:
        if unit is None or i.node == unit:
            out[i.llm] = out.get(i.llm, 0) + 1
    return out


def choose_node(nodes: Sequence[SlurmNode] | None, unit: str, need: int, *, exclude: Iterable[str] = (),
                avoid: Iterable[str] = ()) -> str | None:
    """The node to run `unit` on: None when no node fits. Without node information (the local backend) the
    unit's own node. Otherwise a usable node not excluded with `need` GPUs free, preferring one not in
    `avoid` (nodes the deployment already runs on), then the unit's own node, then by name."""
    excluded, avoided = set(exclude), set(avoid)
    if nodes is None:
        return None if unit in excluded else unit
    fits = [n for n in nodes if n.usable and n.name not in excluded and n.gpus - n.gpus_alloc >= need]
    if not fits:
        return None
    return min(fits, key=lambda n: (n.name in avoided, n.name != unit, n.name)).name


def part_dir(deployment_dir: Path, job_name: str) -> Path:
    """The session directory of one job of a deployment."""
    return deployment_dir / "jobs" / job_name


@dataclass(frozen=True)
class Lead:
    """How long before a job's end its replacement is asked for: the queue wait seen on this backend and
    partition, plus the time its engines took to become healthy, plus a margin."""

    queue_s: float
    healthy_s: float
    margin_s: float

    @property
    def total_s(self) -> float:
        """The lead, in seconds."""
        return self.queue_s + self.healthy_s + self.margin_s
