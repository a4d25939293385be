"""The local Slurm cluster of scripts/slurm-local.sh: its shape, fake GPUs, accounting, and our parsers on it.

The expected shape is configs/clusters/local.yaml: node1..node4 with 4 H100s each in partition gpu, leaf1 =
node[1-2] and leaf2 = node[3-4] under spine.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest

from scepsy_hpc.topology.discover import discover
from scepsy_hpc.topology.model import Network, SlurmNode
from scepsy_hpc.topology.slurmnodes import parse_scontrol_nodes
from scepsy_hpc.topology.slurmtopo import parse_scontrol_topology

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

NODES = ["node1", "node2", "node3", "node4"]
T = TypeVar("T")


def _run(*argv: str, timeout_s: float = 30.0) -> str:
    """stdout of a Slurm command that must succeed."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr.strip()}"
    return done.stdout


def _poll(fetch: Callable[[], T], done: Callable[[T], bool], timeout_s: float) -> T:
    """fetch() until done(value) or the timeout; the last value either way, for the caller to assert on."""
    deadline = time.monotonic() + timeout_s
    value = fetch()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.3)
        value = fetch()
    return value


def _gpu_indices(text: str) -> list[int]:
    return [int(i) for i in text.strip().split(",") if i]


def _assert_local_shape(network: Network, nodes: list[SlurmNode]) -> None:
    assert set(network.switches) == {"leaf1", "leaf2", "spine"}
    assert network.switches["leaf1"].nodes == ("node1", "node2")
    assert network.switches["leaf2"].nodes == ("node3", "node4")
    assert network.switches["spine"].children == ("leaf1", "leaf2")
    assert network.switches["spine"].nodes == ()
    assert sorted(n.name for n in nodes) == NODES
    for node in nodes:
        assert (node.name, node.gpus, node.gpu_type, node.usable) == (node.name, 4, "h100", True)
        assert "gpu" in node.partitions


def test_sinfo_lists_four_idle_nodes_with_four_h100s_in_partition_gpu() -> None:
    def rows() -> dict[str, tuple[str, str, str]]:
        out = _run("sinfo", "-h", "-N", "-p", "gpu", "-o", "%N|%P|%t|%G")
        cells = [line.split("|") for line in out.splitlines() if line.strip()]
        return {c[0]: (c[1].rstrip("*"), c[2], c[3]) for c in cells}

    # A job of an earlier run may still be completing; give the nodes a moment to go back to idle.
    got = _poll(rows, lambda r: all(state == "idle" for _, state, _ in r.values()), timeout_s=20)
    assert got == {n: ("gpu", "idle", "gpu:h100:4") for n in NODES}


def test_srun_with_two_gpus_sees_two_devices() -> None:
    out = _run("srun", "-p", "gpu", "-N1", "--gres=gpu:2", "printenv", "CUDA_VISIBLE_DEVICES")
    gpus = _gpu_indices(out)
    assert len(gpus) == 2
    assert len(set(gpus)) == 2
    assert all(0 <= g < 4 for g in gpus)


def test_two_concurrent_two_gpu_jobs_on_one_node_get_disjoint_devices(tmp_path: Path) -> None:
    seen = tmp_path / "first.gpus"
    # The first job holds its 2 GPUs until cancelled; it writes them atomically so a partial file is never read.
    script = f"printenv CUDA_VISIBLE_DEVICES > {seen}.tmp && mv {seen}.tmp {seen}; sleep 120"
    first = _run("sbatch", "--parsable", "-p", "gpu", "-w", "node2", "--gres=gpu:2", "-t", "5",
                 "-o", str(tmp_path / "first.out"), "--wrap", script).strip().split(";")[0]
    try:
        first_gpus = _poll(lambda: seen.read_text() if seen.exists() else "", bool, timeout_s=30)
        second = _run("srun", "-p", "gpu", "-w", "node2", "-N1", "--gres=gpu:2", "--immediate=20",
                      "printenv", "CUDA_VISIBLE_DEVICES", timeout_s=40)
        still = _run("squeue", "-h", "-j", first, "-o", "%T").strip()
    finally:
        subprocess.run(["scancel", first], capture_output=True, timeout=15)
    assert still == "RUNNING", "the first job ended before the second ran, so they did not overlap"
    a, b = _gpu_indices(first_gpus), _gpu_indices(second)
    assert len(a) == 2 and len(b) == 2
    assert set(a).isdisjoint(b)


def test_gpu_array_completes_and_sacct_lists_every_task(tmp_path: Path) -> None:
    out = _run("sbatch", "--parsable", "-p", "gpu", "--array=0-3", "--gres=gpu:1", "-t", "2",
               "-o", str(tmp_path / "arr-%A_%a.out"), "--wrap", "printenv CUDA_VISIBLE_DEVICES")
    job = out.strip().split(";")[0]
    expected = {f"{job}_{i}": "COMPLETED" for i in range(4)}

    def states() -> dict[str, str]:
        rows = _run("sacct", "-j", job, "-X", "-n", "-P", "-o", "JobID,State").splitlines()
        return dict(row.split("|", 1) for row in rows if row.strip())

    # sacct shows a job a fraction of a second after it ends; the array first appears as one pending row.
    assert _poll(states, lambda s: s == expected, timeout_s=45) == expected
    outputs = sorted(tmp_path.glob(f"arr-{job}_*.out"))
    assert len(outputs) == 4
    for path in outputs:
        assert len(_gpu_indices(path.read_text())) == 1


def test_scontrol_output_parses_to_the_local_cluster_shape() -> None:
    network = parse_scontrol_topology(_run("scontrol", "show", "topology"))
    nodes = parse_scontrol_nodes(_run("scontrol", "show", "node", "--oneliner"))
    _assert_local_shape(network, nodes)


def test_discover_on_partition_gpu_returns_the_local_cluster_shape() -> None:
    network, nodes = discover(partition="gpu")
    _assert_local_shape(network, nodes)


def test_plan_places_on_the_discovered_cluster(tmp_path: Path) -> None:
    """A slurm:-only cluster spec: `scepsy plan --cluster` discovers the real nodes, switches and GPUs."""
    import json
    import sys

    root = Path(__file__).resolve().parents[2]
    spec = tmp_path / "site.yaml"
    spec.write_text("name: site\nslurm: {partition: gpu, gpu_types: {h100: h100-sxm}}\n")
    done = subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", "plan", str(root / "tests" / "data" / "small_rag.yaml"),
                           "--cluster", str(spec), "--json", "--samples", "300", "--target-rps", "20"],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr
    d = json.loads(done.stdout)
    assert d["gpus_total"] == 16 and d["gpu_type"] == "h100-sxm"
    nodes = {p["node"] for p in d["placement"]}
    assert nodes <= set(NODES) and d["fragmentation"]["nodes_used"] == d["fragmentation"]["nodes_min"]
    # as few leaf switches as the GPUs allow: one leaf holds 8 GPUs
    expected_leaves = 1 if d["gpus_used"] <= 8 else 2
    assert d["fragmentation"]["leaves_used"] == expected_leaves
