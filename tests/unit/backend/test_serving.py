"""The steps of `scepsy up/status/down` as library calls: serve.json from a placement (defaults from
the one place), a session already up is refused, status and down read the typed records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scepsy_hpc.backend.local import LocalBackend
from scepsy_hpc.backend.serving import HEALTH_TIMEOUT_S, claim_session, serve_config, session_status, take_down, write_serve_files
from scepsy_hpc.backend.session import Session
from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.catalog import config_dir, load_gpus, load_models
from scepsy_hpc.spec.placement_entry import PlacementEntry
from scepsy_hpc.spec.plan import parse_plan
from scepsy_hpc.spec.source import parse_yaml
from scepsy_hpc.spec.workflow import load_workflow


@pytest.fixture(scope="module")
def inputs():
    models, gpus = load_models(), load_gpus()
    wf = load_workflow(config_dir() / "workflows" / "rag_rerank.yaml", models)
    data = {"workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 5},
            "allocation": {"generator": {"tp": 4}, "rewriter": {"gpu_frac": 0.5}, "reranker": {"gpu_frac": 0.5}}}
    plan = parse_plan(*parse_yaml(json.dumps(data)), wf, models, gpus)
    return plan, wf, models, gpus


def test_a_hand_written_placement_gets_the_default_memory_fraction_mps_share_and_port(inputs) -> None:
    plan, wf, models, gpus = inputs
    placement = [PlacementEntry(llm="generator", replica=0, node="n1", gpus=[0, 1, 2, 3]),
                 PlacementEntry(llm="rewriter", replica=0, node="n2", gpus=[0]),
                 PlacementEntry(llm="reranker", replica=0, node="n2", gpus=[0], mem_frac=0.4, port=9000)]
    cfg = serve_config(plan, wf, models, gpus, placement, engine="sim", time_scale=0.5)
    gen, rew, rer = cfg.instances
    assert (gen.launch.mem_frac, gen.mps_pct, gen.port, gen.launch.tp) == (pytest.approx(0.9), 100, 8100, 4)
    assert (rew.launch.mem_frac, rew.mps_pct, rew.port) == (pytest.approx(0.45), 50, 8100)
    assert (rer.launch.mem_frac, rer.mps_pct, rer.port) == (0.4, 50, 9000)
    assert cfg.health_timeout_s == HEALTH_TIMEOUT_S["sim"] and rew.launch.time_scale == 0.5


def test_claim_refuses_a_session_whose_job_runs_and_clears_stale_files(tmp_path: Path) -> None:
    session = Session(tmp_path / "demo")
    backend = LocalBackend(tmp_path / ".local-jobs")
    (session.dir / "agents").mkdir(parents=True)
    (session.dir / "agents" / "n1.json").write_text("{}")
    session.endpoints_path.write_text("llms: {}")
    claim_session(session, backend)   # no record yet: nothing runs
    assert not (session.dir / "agents" / "n1.json").exists() and not session.endpoints_path.exists()
    from scepsy_hpc.backend.base import NodeJob

    job_id = backend.submit(NodeJob(name="scepsy-demo", command=("sleep", "60"), nodes=("n1",), gpus_per_node=1,
                                    log_dir=session.log_dir, workdir=tmp_path))
    try:
        session.update(name="demo", job_id=job_id, state="serving")
        with pytest.raises(SpecError) as err:
            claim_session(session, backend)
        assert f"already up (job {job_id})" in str(err.value)
        assert take_down(session, backend, timeout_s=20.0) == job_id
        assert session.info().state == "down" and not backend.in_queue(job_id)
        claim_session(session, backend)   # the job is gone: the name is free again
    finally:
        backend.cancel(job_id, grace_s=1.0)


def test_status_reads_the_records(tmp_path: Path) -> None:
    session = Session(tmp_path / "demo")
    session.update(name="demo", backend="local", state="starting", workflow="rag_rerank")
    s = session_status(session, LocalBackend(tmp_path / ".local-jobs"))
    assert (s["name"], s["state"], s["backend"], s["workflow"], s["instances"]) == ("demo", "starting", "local", "rag_rerank", [])
    assert s["gateway_healthy"] is False


def test_write_serve_files_copies_the_plan_owner_only(tmp_path: Path, inputs) -> None:
    plan, wf, models, gpus = inputs
    session = Session(tmp_path / "demo")
    cfg = serve_config(plan, wf, models, gpus, [PlacementEntry(llm="generator", replica=0, node="n1", gpus=[0, 1, 2, 3])],
                       engine="sim")
    src = tmp_path / "plan.yaml"
    src.write_text("gpus: {type: h100-sxm, count: 4}\n")
    write_serve_files(session, cfg, src)
    assert session.serve_config() == cfg
    assert (session.dir / "plan.yaml").read_text() == src.read_text()
    assert (session.dir / "plan.yaml").stat().st_mode & 0o077 == 0
