"""The request cap reaches the gateway: `scepsy plan` writes `predicted.max_requests` for a workflow whose calls
continue conversations (the requests in flight near its predicted capacity); `up --max-requests plan` takes it
(or `--max-requests N`; none by default) into the deployment's options, and `write_endpoints` gives the gateway
`max_requests: {deployment: N}`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.service.test_weights_endpoints import _mixed_plan

pytestmark = pytest.mark.timeout(60)


def _plan_with_cap(path: Path, cap: Any) -> Path:
    _mixed_plan(path)
    data = yaml.safe_load(path.read_text())
    if cap is not None:
        data["predicted"] = {"rate_rps": 2.0, "latency_s": 10.0, "throughput_rps": 2.2, "max_requests": cap}
    path.write_text(yaml.safe_dump(data))
    return path


async def _up(tmp_path: Path, cap_in_plan: Any, flag: Any) -> Any:
    from scepsy_hpc.service.daemon import Daemon
    from scepsy_hpc.service.deploy import UpRequest
    from scepsy_hpc.service.paths import StatePaths
    from tests.unit.service.test_weights_endpoints import _NoRunBackend

    paths = StatePaths(tmp_path / "state")
    paths.ensure()
    daemon = Daemon(paths, backends={"local": _NoRunBackend(paths.local_jobs)})
    await daemon.up(UpRequest(name="mx", target=str(_plan_with_cap(tmp_path / "p.yaml", cap_in_plan)), max_requests=flag))
    daemon.store.update_deployment("mx", state="serving")   # its engines not started yet: the gateway holds calls
    return daemon


async def test_max_requests_plan_takes_the_plans_figure_to_the_gateway(tmp_path: Path) -> None:
    from scepsy_hpc.gateway.endpoints import load_endpoints

    daemon = await _up(tmp_path, 37, "plan")
    daemon.write_endpoints()
    doc = yaml.safe_load(daemon.gateway.endpoints.read_text())
    assert doc["max_requests"] == {"mx": 37}
    assert load_endpoints(daemon.gateway.endpoints).request_caps() == {"mx": 37}   # the gateway reads it
    said = [e.message for e in daemon.store.events("mx")]
    assert any("at most 37 requests be in flight, later ones wait (the plan's predicted.max_requests)" in m
               for m in said), said


@pytest.mark.parametrize("flag,want", [(5, 5), (None, None)])
async def test_a_number_is_the_cap_and_none_is_the_default(tmp_path: Path, flag: Any, want: Any) -> None:
    daemon = await _up(tmp_path, 37, flag)
    assert daemon.store.get_deployment("mx").options["request_cap"] == want
    daemon.write_endpoints()
    doc = yaml.safe_load(daemon.gateway.endpoints.read_text())
    assert doc.get("max_requests") == ({"mx": want} if want else None)


async def test_max_requests_plan_with_a_plan_that_has_none_is_refused(tmp_path: Path) -> None:
    from scepsy_hpc.errors import SpecError

    with pytest.raises(SpecError, match=r"--max-requests plan: the plan .*p.yaml gives no predicted.max_requests .*"
                                        r"give a number: --max-requests N"):
        await _up(tmp_path, None, "plan")


def test_request_cap_of_sums_a_multi_workflow_plans_figures() -> None:
    from scepsy_hpc.errors import SpecError
    from scepsy_hpc.service.deploy import UpRequest, request_cap_of
    from scepsy_hpc.spec.plan import Plan

    base = {"gpus": {"type": "h100-sxm", "count": 2}, "allocation": {"a": {"tp": 1}}}
    multi = Plan.model_validate({**base, "workflows": ["w1", "w2"],
                                 "predicted": {"w1": {"max_requests": 10}, "w2": {"max_requests": 32}}})
    req = UpRequest(name="d", target="x", max_requests="plan")
    assert request_cap_of(multi, req) == 42
    partial = Plan.model_validate({**base, "workflows": ["w1", "w2"], "predicted": {"w1": {"max_requests": 10}, "w2": {}}})
    with pytest.raises(SpecError, match="for every workflow"):   # a workflow without a figure: no guess
        request_cap_of(partial, req)
    single = Plan.model_validate({**base, "workflow": "w1", "predicted": {"max_requests": True}})
    with pytest.raises(SpecError, match="no predicted.max_requests"):
        request_cap_of(single, req)
    assert request_cap_of(single, UpRequest(name="d", target="x", max_requests=9)) == 9


@pytest.mark.timeout(300)
def test_the_plans_cap_keeps_a_conversation_workflow_at_its_capacity(models: Any, gpus: Any) -> None:
    """plan_execute's max-throughput plan on 8 GPUs, offered 1.25× its predicted capacity: uncapped its
    conversations collapse it (the simulator serves ~0.75 rps of 2.5); held to the plan's figure it serves about
    its capacity. A workflow without conversations gets no figure (a cap would only cost it)."""
    from scepsy_hpc.allocate.allocation import as_allocation
    from scepsy_hpc.planning import PlanRequest, plan
    from scepsy_hpc.planning.render import to_plan
    from scepsy_hpc.sim import simulate
    from scepsy_hpc.spec.catalog import config_dir
    from scepsy_hpc.spec.workflow import load_workflow

    def planned(name: str) -> tuple[Any, Any]:
        wf = load_workflow(config_dir() / "workflows" / f"{name}.yaml", models)
        result = plan(PlanRequest(workflows=(wf,), models=models, gpus=gpus, gpu_count=8, samples=300,
                                  sim_check=False, goal="max-throughput", target_rps={name: 1.0}))
        return wf, result

    wf, result = planned("plan_execute")
    pred = to_plan(result).predicted
    assert pred is not None
    cap = pred["max_requests"]
    assert 0.8 < cap / (pred["rate_rps"] * pred["latency_s"]) < 1.25   # about the requests in flight as planned
    alloc, gpu, rate = as_allocation(result.outcome.choice), gpus["h100-sxm"], 1.25 * pred["throughput_rps"]
    free, held = (simulate(wf, alloc, gpu, models, rate_rps=rate, n_requests=800, seed=0, max_requests=m)
                  for m in (None, cap))
    assert held.throughput_rps > 1.5 * free.throughput_rps, (held.throughput_rps, free.throughput_rps)
    assert held.throughput_rps > 0.75 * pred["rate_rps"]
    _, rag = planned("rag_rerank")
    assert "max_requests" not in (to_plan(rag).predicted or {})
