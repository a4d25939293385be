"""`scepsy topology show` from each source, as a user runs it (real subprocesses)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CAPTURES = ROOT.parent / "shared" / "reference" / "topology-captures"
DATA = ROOT / "tests" / "data" / "topology"


def scepsy(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)


def capture(name: str) -> Path:
    path = CAPTURES / name
    if not path.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing; CI must provide the topology captures")
        pytest.skip(f"{path} not available")
    return path


def expected(name: str) -> dict:
    return json.loads((CAPTURES / "EXPECTED.json").read_text())[name]


@pytest.mark.parametrize("name", ["nvsmi-02-v100-dgx1-cubemesh-spaces.txt", "nvsmi-07-b200-8gpu-nvswitch-glued-cells.txt",
                                  "nvsmi-11-rtx-a6000-3gpu-one-bridged-pair.txt"])
def test_nvsmi_json_has_gpus_and_nvlink_domains(name):
    out = scepsy("topology", "show", "--nvsmi", str(capture(name)), "--json")
    assert out.returncode == 0, out.stderr
    d, e = json.loads(out.stdout), expected(name)
    assert d["gpus"] == e["gpus"] and d["nvlink_domains"] == e["nvlink_domains"]
    assert [tuple(p) for p in d["nvlink_pairs"]] == [tuple(p) for p in e["nvlink_pairs"]]


def test_topology_conf_json_has_switches():
    name = "slurmtopo-02-nstda-tara-tree.conf"
    out = scepsy("topology", "show", "--topology-conf", str(capture(name)), "--json")
    assert out.returncode == 0, out.stderr
    d, e = json.loads(out.stdout), expected(name)
    assert d["switches"] == e["switches"] and d["derived_levels"] == e["derived_levels"]
    human = scepsy("topology", "show", "--topology-conf", str(capture(name)))
    assert "switch s4 (level 1)" in human.stdout and "tara-dgx1-001" in human.stdout


def test_scontrol_blocks():
    name = "slurmtopo-07-crusoe-gb200-nvl72-blocks-show-topology.txt"
    out = scepsy("topology", "show", "--scontrol", str(capture(name)), "--json")
    assert out.returncode == 0, out.stderr
    d, e = json.loads(out.stdout), expected(name)
    assert d["blocks"] == e["blocks"] and d["block_sizes"] == e["block_sizes"]


def test_gres_links_into_domains():
    name = "gres-01-baobab-gpu048-slurmd-G.conf"
    out = scepsy("topology", "show", "--gres", str(capture(name)), "--json")
    assert out.returncode == 0, out.stderr
    node = next(iter(json.loads(out.stdout)["nodes"].values()))
    assert node["nvlink_domains"] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_corrupt_file_names_its_line(tmp_path):
    bad = tmp_path / "topology.conf"
    bad.write_text("SwitchName=s1 Nodes=n[1-4]\nSwitchName=s2 Nodez=n[5-8]\n")
    out = scepsy("topology", "show", "--topology-conf", str(bad))
    assert out.returncode == 2
    assert "topology.conf line 2" in out.stderr and "Nodez" in out.stderr


def test_cluster_spec_tree():
    out = scepsy("topology", "show", "--cluster", "local", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["switches"]["spine"]["children"] == ["leaf1", "leaf2"]
    assert [n["name"] for n in d["nodes"]] == ["node1", "node2", "node3", "node4"]


def fake_scontrol(tmp_path: Path, topology: str, fail: bool = False) -> dict:
    """A PATH with an `scontrol` answering `show topology` and `show node --oneliner` from files."""
    (tmp_path / "topo.txt").write_text(topology)
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    body = ("echo 'slurm_load_ctl_conf error: Unable to contact slurm controller (connect failure)' >&2; exit 1"
            if fail else
            f'case "$*" in\n  "show topology") cat {tmp_path / "topo.txt"} ;;\n'
            f'  "show node --oneliner") cat {DATA / "scontrol-show-node-oneliner.txt"} ;;\n'
            f'  *) echo "unexpected: $*" >&2; exit 1 ;;\nesac')
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{script.parent}:{os.environ['PATH']}"}


def test_live_slurm_through_scontrol(tmp_path):
    env = fake_scontrol(tmp_path, "SwitchName=leaf1 Level=0 LinkSpeed=1 Nodes=gpu[01-02]\n"
                                  "SwitchName=leaf2 Level=0 LinkSpeed=1 Nodes=gpu03,cpu01\n"
                                  "SwitchName=spine Level=1 LinkSpeed=1 Nodes=gpu[01-03],cpu01 Switches=leaf[1-2]\n")
    out = scepsy("topology", "show", "--slurm", "--json", env=env)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["switches"]["spine"] == {"level": 1, "nodes": [], "children": ["leaf1", "leaf2"]}
    nodes = {n["name"]: n for n in d["nodes"]}
    assert nodes["gpu01"]["gpus"] == 4 and nodes["gpu01"]["gpus_alloc"] == 2 and nodes["gpu01"]["usable"]
    assert not nodes["gpu03"]["usable"]
    human = scepsy("topology", "show", "--slurm", env=env)
    assert "gpu01 (4 GPUs h100, mixed)" in human.stdout and "cpu01 (0 GPUs, idle)" in human.stdout
    assert "under no switch: mix01" in human.stdout


def test_slurm_failure_is_translated(tmp_path):
    env = fake_scontrol(tmp_path, "", fail=True)
    out = scepsy("topology", "show", "--slurm", env=env)
    assert out.returncode == 1
    assert "`scontrol show topology` failed (exit 1): slurm_load_ctl_conf error: Unable to contact" in out.stderr
    assert "Traceback" not in out.stderr


SLURM_TOPO = ("SwitchName=leaf1 Level=0 LinkSpeed=1 Nodes=gpu[01-02]\n"
              "SwitchName=leaf2 Level=0 LinkSpeed=1 Nodes=gpu03,cpu01\n")


def test_plan_on_a_discovered_slurm_partition_uses_only_free_gpus(tmp_path):
    """slurm:-only cluster spec: nodes come from scontrol; drained/down nodes and busy GPUs are left out."""
    env = fake_scontrol(tmp_path, SLURM_TOPO)
    spec = tmp_path / "site.yaml"
    spec.write_text("name: site\nslurm: {partition: gpu, gpu_types: {h100: h100-sxm}}\n")
    out = scepsy("plan", str(ROOT / "tests" / "data" / "small_rag.yaml"), "--cluster", str(spec), "--json",
                 "--samples", "300", env=env)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["gpu_type"] == "h100-sxm" and d["gpus_total"] == 2      # gpu01: 4 GPUs, 2 allocated (IDX 0-1)
    assert {p["node"] for p in d["placement"]} == {"gpu01"}
    assert all(set(p["gpus"]) <= {2, 3} for p in d["placement"])


def test_ambiguous_gres_type_asks_for_a_mapping(tmp_path):
    env = fake_scontrol(tmp_path, SLURM_TOPO)
    spec = tmp_path / "site.yaml"
    spec.write_text("name: site\nslurm: {partition: gpu}\n")
    out = scepsy("plan", str(ROOT / "tests" / "data" / "small_rag.yaml"), "--cluster", str(spec), env=env)
    assert out.returncode == 2
    assert "Slurm GPU type 'h100' has no GPU catalog entry; it could be h100-sxm or h100-pcie" in out.stderr
    assert "gpu_types: {h100: <catalog name>}" in out.stderr


def test_catalog_type_matching():
    from scepsy_hpc.errors import TopologyError
    from scepsy_hpc.spec.catalog import load_gpus
    from scepsy_hpc.topology.build import catalog_type

    cat = load_gpus(ROOT / "configs" / "gpus.yaml")
    assert catalog_type("h200", cat) == "h200"
    assert catalog_type("nvidia_h200", cat) == "h200"
    assert catalog_type("NVIDIA_L40S", cat) == "l40s"
    assert catalog_type("h100", cat, {"h100": "h100-pcie"}) == "h100-pcie"
    with pytest.raises(TopologyError, match="'v100' has no GPU catalog entry; the catalog has"):
        catalog_type("v100", cat)
