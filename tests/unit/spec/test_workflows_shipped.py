"""Every shipped workflow in configs/workflows/ is valid against the shipped model catalog."""

from __future__ import annotations

from pathlib import Path

import pytest

from scepsy_hpc.spec.catalog import ModelSpec, config_dir, load_models
from scepsy_hpc.spec.workflow import CallStep, ToolStep, UseStep, Workflow, _all_bodies, load_workflow, resolve_model

WORKFLOW_DIR = Path(__file__).resolve().parents[3] / "configs" / "workflows"
FILES = sorted(WORKFLOW_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def models():
    return load_models()


def test_workflow_dir_is_config_dir():
    assert WORKFLOW_DIR == config_dir().resolve() / "workflows"


def test_there_are_shipped_workflows():
    assert len(FILES) >= 5
    assert {"deep_research", "rag_rerank"} <= {p.stem for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_shipped_workflow_loads(path, models):
    wf = load_workflow(path, models)
    assert isinstance(wf, Workflow)
    assert wf.name == path.stem
    assert wf.description.strip()
    assert wf.program
    for llm in wf.llms:
        assert isinstance(resolve_model(wf, llm, models), ModelSpec)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_shipped_workflow_uses_everything_it_declares(path, models):
    wf = load_workflow(path, models)
    steps = [s for s, _ in _all_bodies(wf)]
    called = {s.call for s in steps if isinstance(s, CallStep)}
    assert called == set(wf.llms)
    assert {s.tool for s in steps if isinstance(s, ToolStep)} == set(wf.tools)
    assert {s.use for s in steps if isinstance(s, UseStep)} == set(wf.define)


def test_load_workflow_accepts_str_path(models):
    wf = load_workflow(str(FILES[0]), models)
    assert wf.name == FILES[0].stem
