"""Every command with `--json` prints exactly one JSON document on stdout — whatever the solver or a
library prints (highspy ≥ 1.16 writes a banner from C++ onto fd 1), and on failure too.

Each case runs the real CLI in a subprocess and parses the *whole* stdout with `json.loads`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SMALL = str(ROOT / "tests" / "data" / "small_rag.yaml")


def scepsy(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def whole_json(out: subprocess.CompletedProcess[str]) -> dict:
    """The whole of stdout is one JSON document (not a document after a banner, nor two)."""
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"stdout is not one JSON document ({e}):\n{out.stdout[:500]}\nstderr:\n{out.stderr[-500:]}")


@pytest.fixture(scope="module")
def plan_and_trace(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("json")
    plan, trace = d / "plan.yaml", d / "trace.jsonl"
    out = scepsy("plan", SMALL, "--gpus", "4", "--samples", "300", "-o", str(plan), "--json")
    assert out.returncode == 0, out.stderr
    whole_json(out)
    out = scepsy("simulate", SMALL, "--plan", str(plan), "--rate", "2", "--requests", "60", "--trace", str(trace))
    assert out.returncode == 0, out.stderr
    return plan, trace


def test_plan_json_is_whole_stdout_and_solved(plan_and_trace):
    out = scepsy("plan", SMALL, "--gpus", "4", "--samples", "300", "--json")
    d = whole_json(out)
    assert d["status"] == "optimal" and "HiGHS" not in out.stdout


def test_plan_cluster_json_is_whole_stdout():
    out = scepsy("plan", SMALL, "--cluster", "local", "--samples", "300", "--json")
    assert out.returncode == 0, out.stderr
    d = whole_json(out)
    assert d["placement"], "a --cluster plan carries its placement"


def test_plan_human_output_has_no_solver_banner():
    out = scepsy("plan", SMALL, "--gpus", "4", "--samples", "300")
    assert out.returncode == 0, out.stderr
    assert "Running HiGHS" not in out.stdout + out.stderr and "Copyright" not in out.stdout + out.stderr
    assert "rewriter" in out.stdout


def test_validate_json(plan_and_trace):
    plan, _ = plan_and_trace
    d = whole_json(scepsy("validate", SMALL, str(plan), "--json"))
    assert d["ok"] is True and [f["kind"] for f in d["files"]] == ["workflow", "plan"]


def test_validate_json_reports_problems_as_json(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nllms: {a: {model: no-such-model}}\nprogram: [{call: a, prompt_tokens: 10, output_tokens: 5}]\n")
    out = scepsy("validate", str(bad), "--json")
    d = whole_json(out)
    assert out.returncode == 2 and d["ok"] is False and d["problems"]
    assert any("no-such-model" in p for p in d["problems"])


def test_simulate_json(plan_and_trace):
    plan, _ = plan_and_trace
    d = whole_json(scepsy("simulate", SMALL, "--plan", str(plan), "--rate", "2", "--requests", "40", "--json"))
    assert d["completed"] == 40


def test_predict_json(plan_and_trace):
    plan, _ = plan_and_trace
    d = whole_json(scepsy("predict", SMALL, "--plan", str(plan), "--rate", "2", "--samples", "200", "--json"))
    assert d["latency_s"] > 0 and d["rate_rps"] == 2.0


def test_stats_json(plan_and_trace):
    _, trace = plan_and_trace
    d = whole_json(scepsy("stats", str(trace), "--json"))
    assert d["requests"] == 60 and set(d["per_llm"]) == {"rewriter", "reranker", "answer"}


def test_topology_show_json():
    d = whole_json(scepsy("topology", "show", "--cluster", "local", "--json"))
    assert d["source"] == "local" and d["switches"]


def test_bench_json_tiny_case():
    out = scepsy("bench", "--workflows", SMALL, "--gpus", "4", "--policies", "milp,equal", "--requests", "120",
                 "--jobs", "1", "--samples", "200", "--json", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    d = whole_json(out)
    (cell,) = d["cells"]
    assert cell["workflow"] == "small_rag" and set(cell["policies"]) == {"milp", "equal"}


def test_profile_json_synthetic(tmp_path):
    out = scepsy("profile", SMALL, "--tp", "1", "--gpu-frac", "1", "--llms", "rewriter", "--calls", "200",
                 "--samples", "200", "-o", str(tmp_path / "prof"), "--json")
    assert out.returncode == 0, out.stderr
    d = whole_json(out)
    assert [p["llm"] for p in d["profiled"]] == ["rewriter"] and not d["failed"]


def test_status_json_without_a_daemon(tmp_path):
    out = scepsy("status", "--state-dir", str(tmp_path), "--json")
    d = whole_json(out)
    assert out.returncode == 1 and d["error"]["type"] == "DaemonNotRunning" and "scepsy daemon start" in d["error"]["message"]


def test_daemon_ls_and_status_json_are_one_document_each(tmp_path):
    state = str(tmp_path / "state")
    try:
        started = scepsy("daemon", "start", "--json", "--state-dir", state)
        assert whole_json(started)["pid"] > 0
        assert whole_json(scepsy("daemon", "status", "--json", "--state-dir", state))["deployments"] == 0
        assert whole_json(scepsy("ls", "--json", "--state-dir", state))["deployments"] == []
        first = whole_json(scepsy("events", "--json", "--state-dir", state))[0]
        assert first["kind"] == "daemon" and first["time"] and first["detail"]
        missing = scepsy("status", "nope", "--json", "--state-dir", state)
        assert missing.returncode == 2 and "no deployment 'nope'" in whole_json(missing)["error"]["message"]
    finally:
        scepsy("daemon", "stop", "--all", "--state-dir", state)


def test_a_failure_under_json_is_one_json_error_document():
    out = scepsy("plan", SMALL, "--gpus", "1", "--target-rps", "500", "--samples", "200", "--json")
    assert out.returncode != 0
    d = whole_json(out)
    assert d["error"]["type"] == "InfeasibleError" and d["error"]["exit_code"] == out.returncode
    assert "GPU" in d["error"]["message"]
