"""`up` checks a plan's placement against the cluster spec before anything is written or submitted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scepsy_hpc.errors import SpecError
from scepsy_hpc.service.deploy import UpRequest, load_target, placement_of
from scepsy_hpc.spec.catalog import load_gpus, load_models
from scepsy_hpc.spec.cluster import load_cluster
from scepsy_hpc.spec.plan import load_plan
from scepsy_hpc.spec.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[3]


def _placed_plan(tmp_path: Path, change: dict[str, object]) -> tuple[Path, object, object, object]:
    models, gpus = load_models(), load_gpus()
    cluster = load_cluster(ROOT / "configs/clusters/local.yaml", gpus)
    wf_path = ROOT / "configs/workflows/rag_rerank.yaml"
    plan = load_plan(ROOT / "configs/plans/rag_rerank.yaml", load_workflow(wf_path, models), models, gpus)
    doc = yaml.safe_load((ROOT / "configs/plans/rag_rerank.yaml").read_text())
    doc["provenance"] = {**(doc.get("provenance") or {}), "workflow_file": str(wf_path)}
    doc["placement"] = [e.model_dump(mode="json") for e in placement_of(plan, cluster, gpus)]
    doc["placement"][0].update(change)
    path = tmp_path / "placed.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, models, gpus, cluster


@pytest.mark.parametrize("change, words", [
    ({"node": "node99"}, ["node99", "placement[0]"]),
    ({"gpus": [99]}, ["99", "placement[0]"]),
])
def test_a_placement_off_the_cluster_is_refused_naming_the_entry(tmp_path: Path, change: dict[str, object],
                                                                 words: list[str]) -> None:
    path, models, gpus, cluster = _placed_plan(tmp_path, change)
    session = tmp_path / "session"
    with pytest.raises(SpecError) as err:
        load_target(UpRequest(name="d", target=str(path)), session, models, gpus, cluster, lambda _: None)
    message = str(err.value)
    assert all(w in message for w in words), message
    assert f"{path}:" in message            # file:line
    assert not session.exists()             # nothing written


def test_a_good_placement_is_served_as_given(tmp_path: Path) -> None:
    path, models, gpus, cluster = _placed_plan(tmp_path, {})
    plan, wfs, plan_path, _ = load_target(UpRequest(name="d", target=str(path)), tmp_path, models, gpus, cluster,
                                          lambda _: None)
    assert plan_path == path and plan.placement and [w.name for w in wfs] == ["rag_rerank"]


def test_on_slurm_the_live_partition_judges_the_nodes_not_the_spec(tmp_path: Path) -> None:
    # The backend's preflight checks nodes and GPUs against the partition (tests/integration/test_slurm_serving.py):
    # a spec's static node list must not refuse a plan placed for the real cluster.
    path, models, gpus, cluster = _placed_plan(tmp_path, {"node": "gpu-a01"})
    plan, _, _, _ = load_target(UpRequest(name="d", target=str(path), backend="slurm"), tmp_path, models, gpus,
                                cluster, lambda _: None)
    assert plan.placement[0].node == "gpu-a01"
