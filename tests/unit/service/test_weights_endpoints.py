"""A mixed group's routing weights reach the gateway's endpoints file: `up` computes them from the plan once
(`deploy.weights_of`, kept in the deployment's options, so a restarted daemon has them too) and
`write_endpoints` gives each routed replica its own by replica number; like replicas are written as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from scepsy_hpc.backend.base import NodeJob
from scepsy_hpc.backend.local import LocalBackend

pytestmark = pytest.mark.timeout(20)


class _NoRunBackend(LocalBackend):
    """The local backend, except that a submitted job is only recorded (the test plays the agents' part)."""

    def submit(self, job: NodeJob) -> str:
        self.submitted = getattr(self, "submitted", 0) + 1
        return f"local-{90000 + self.submitted}"


def _mixed_plan(path: Path, capacity: tuple[float, float] | None = None) -> Path:
    """rag_rerank with its rewriter as a mixed group: replica 0 at tp=2, replica 1 half a GPU (beside the reranker)."""
    groups: list[dict[str, Any]] = [{"tp": 2}, {"gpu_frac": 0.5}]
    if capacity is not None:
        groups = [{**g, "capacity_rps": c} for g, c in zip(groups, capacity)]
    path.write_text(yaml.safe_dump({
        "workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 7},
        "allocation": {"generator": {"tp": 4}, "rewriter": groups, "reranker": {"gpu_frac": 0.5}},
        "placement": [
            {"llm": "generator", "replica": 0, "node": "node1", "gpus": [0, 1, 2, 3]},
            {"llm": "rewriter", "replica": 0, "node": "node2", "gpus": [0, 1]},
            {"llm": "rewriter", "replica": 1, "node": "node2", "gpus": [2]},
            {"llm": "reranker", "replica": 0, "node": "node2", "gpus": [2]}]}))
    return path


async def _endpoints_after_up(tmp_path: Path, plan: Path) -> tuple[dict[str, Any], Any]:
    from scepsy_hpc.service.daemon import Daemon
    from scepsy_hpc.service.deploy import UpRequest
    from scepsy_hpc.service.paths import StatePaths
    from scepsy_hpc.service.state import InstanceRow

    paths = StatePaths(tmp_path / "state")
    paths.ensure()
    daemon = Daemon(paths, backends={"local": _NoRunBackend(paths.local_jobs)})
    await daemon.up(UpRequest(name="mx", target=str(plan)))
    # what the agents' reports become: every engine routed (the gateway sends it calls)
    rows = [InstanceRow(deployment="mx", llm=llm, replica=rep, node=node, url=f"http://{node}:{port}", healthy=True,
                        state="healthy", routed=True, job_id=job)
            for llm, rep, node, port, job in (("generator", 0, "node1", 8100, "local-90001"),
                                              ("rewriter", 0, "node2", 8101, "local-90002"),
                                              ("rewriter", 1, "node2", 8102, "local-90002"),
                                              ("reranker", 0, "node2", 8103, "local-90002"))]
    daemon.store.set_instances("mx", rows)
    daemon.store.update_deployment("mx", state="serving")
    daemon.write_endpoints()
    text = daemon.gateway.endpoints.read_text()
    return yaml.safe_load(text), daemon


async def test_a_mixed_plans_weights_land_in_the_endpoints_file(tmp_path: Path) -> None:
    from scepsy_hpc.gateway.endpoints import load_endpoints
    from scepsy_hpc.perf.fit import replica_weights
    from scepsy_hpc.spec.catalog import load_gpus, load_models
    from scepsy_hpc.spec.plan import LLMAlloc

    doc, daemon = await _endpoints_after_up(tmp_path, _mixed_plan(tmp_path / "p.yaml"))
    reps = {r["url"]: r for r in doc["llms"]["mx/rewriter"]["replicas"]}
    # estimated from the performance model (the plan gives no capacity_rps), 4 significant digits
    want = replica_weights([LLMAlloc(tp=2), LLMAlloc(gpu_frac=0.5)], load_models(None)["llama-3.2-3b-instruct"],
                           load_gpus(None)["h100-sxm"])
    assert reps["http://node2:8101"]["weight"] == pytest.approx(want[0], rel=1e-3)
    assert reps["http://node2:8102"]["weight"] == pytest.approx(want[1], rel=1e-3)
    assert want[0] > 1.5 * want[1]   # the tp=2 engine carries more than half a GPU's
    # like replicas (one configuration): no weight written, as before weights existed
    for llm in ("mx/generator", "mx/reranker"):
        assert all("weight" not in r for r in doc["llms"][llm]["replicas"]), doc["llms"][llm]
    eps = load_endpoints(daemon.gateway.endpoints)   # and the gateway reads the file
    assert [r.weight for r in eps.llms["mx/reranker"].replicas] == [1.0]
    assert daemon.store.get_deployment("mx").options["weights"] == {"rewriter": [reps["http://node2:8101"]["weight"],
                                                                                   reps["http://node2:8102"]["weight"]]}


async def test_the_plans_capacity_rps_is_the_weight(tmp_path: Path) -> None:
    doc, _ = await _endpoints_after_up(tmp_path, _mixed_plan(tmp_path / "p.yaml", capacity=(30.0, 10.0)))
    assert {r["url"]: r["weight"] for r in doc["llms"]["mx/rewriter"]["replicas"]} == {
        "http://node2:8101": 30.0, "http://node2:8102": 10.0}


async def test_a_plan_of_like_replicas_writes_no_weight(tmp_path: Path) -> None:
    plan = tmp_path / "p.yaml"
    _mixed_plan(plan)
    data = yaml.safe_load(plan.read_text())
    data["allocation"]["rewriter"] = {"gpu_frac": 0.5, "replicas": 2}
    data["placement"][1]["gpus"] = [1]
    plan.write_text(yaml.safe_dump(data))
    doc, daemon = await _endpoints_after_up(tmp_path, plan)
    assert "weight" not in daemon.gateway.endpoints.read_text()
    assert len(doc["llms"]["mx/rewriter"]["replicas"]) == 2
    assert daemon.store.get_deployment("mx").options["weights"] == {}
