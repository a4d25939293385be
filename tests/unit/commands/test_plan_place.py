"""`scepsy plan --cluster`: placement in the JSON and the plan file, the plot, re-planning on failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]


def scepsy(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def small() -> str:
    return str(ROOT / "tests" / "data" / "small_rag.yaml")


def test_plan_on_the_local_cluster_places_every_instance(small, tmp_path):
    plan = tmp_path / "plan.yaml"
    png = tmp_path / "placement.png"
    out = scepsy("plan", small, "--cluster", "configs/clusters/local.yaml", "--json", "-o", str(plan),
                 "--plot", str(png), "--samples", "300")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    # per LLM, each replica's configuration (a mixed group's replicas numbered group by group)
    per_replica = {m: [g for g in (a if isinstance(a, list) else [a]) for _ in range(g["replicas"])]
                   for m, a in d["allocation"].items()}
    placed = d["placement"]
    assert sorted((p["llm"], p["replica"]) for p in placed) == sorted((m, r) for m, gs in per_replica.items()
                                                                      for r in range(len(gs)))
    for p in placed:
        assert set(p) >= {"llm", "replica", "node", "gpus", "gpu_frac"}
        g = per_replica[p["llm"]][p["replica"]]
        assert p["node"] in {"node1", "node2", "node3", "node4"} and len(p["gpus"]) == g["tp"]
        assert p["gpu_frac"] == g["gpu_frac"]
    assert d["fragmentation"]["nodes_used"] >= d["fragmentation"]["nodes_min"] >= 1
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    written = yaml.safe_load(plan.read_text())
    assert written["placement"] == [{k: v for k, v in p.items()} for p in placed]
    assert scepsy("validate", str(plan)).returncode == 0


def test_human_output_shows_the_nodes(small):
    out = scepsy("plan", small, "--cluster", "configs/clusters/local.yaml", "--samples", "300")
    assert out.returncode == 0, out.stderr
    assert "placement" in out.stdout and "node1" in out.stdout and "lower bound" in out.stdout


def test_plot_without_cluster_is_refused(small, tmp_path):
    out = scepsy("plan", small, "--gpus", "4", "--plot", str(tmp_path / "x.png"))
    assert out.returncode == 2
    assert "--plot draws the placement: give --cluster" in out.stderr


def test_a_hand_edited_placement_is_checked(small, tmp_path):
    plan = tmp_path / "plan.yaml"
    assert scepsy("plan", small, "--cluster", "configs/clusters/local.yaml", "-o", str(plan), "--samples", "300").returncode == 0
    data = yaml.safe_load(plan.read_text())
    data["placement"][0]["gpus"] = data["placement"][0]["gpus"] + [7]
    plan.write_text(yaml.safe_dump(data, sort_keys=False))
    out = scepsy("validate", str(plan))
    assert out.returncode == 2
    assert "placement[0].gpus" in out.stdout + out.stderr


def test_pairs_cluster_caps_tp_and_keeps_groups_in_pairs(small, tmp_path):
    spec = tmp_path / "pairs.yaml"
    spec.write_text("name: pairs\nnode_groups:\n  - {name: g, nodes: 'p[1-3]', gpu_type: h100-sxm, gpus_per_node: 4, "
                    "nvlink: pairs}\nswitches:\n  - {name: s1, nodes: 'p[1-3]'}\n")
    out = scepsy("plan", small, "--cluster", str(spec), "--json", "--target-rps", "6", "--samples", "300")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert all(g["tp"] <= 2 for a in d["allocation"].values() for g in (a if isinstance(a, list) else [a]))
    for p in d["placement"]:
        if len(p["gpus"]) == 2:
            assert p["gpus"] in ([0, 1], [2, 3])
