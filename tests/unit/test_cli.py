"""The `scepsy` command as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def scepsy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", *args], capture_output=True, text=True, timeout=120)


def test_validate_accepts_every_shipped_file():
    import glob

    files = sorted(glob.glob("configs/workflows/*.yaml") + glob.glob("configs/plans/*.yaml")
                   + glob.glob("configs/clusters/*.yaml") + ["configs/models.yaml", "configs/gpus.yaml"])
    out = scepsy("validate", *files)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": ok (") == len(files)


def test_validate_reports_every_problem_with_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nllms:\n  a: {model: llama-3.1-8b-instruct}\nprogram:\n  - {call: b, prompt_tokens: 1, output_tokens: 1}\n"
                   "  - {tool: web}\n")
    out = scepsy("validate", str(bad))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert any(line.startswith(f"{bad}:5:") and "unknown LLM 'b'" in line for line in lines)
    assert any(line.startswith(f"{bad}:6:") and "unknown tool 'web'" in line for line in lines)
    assert "Traceback" not in out.stderr


def test_simulate_json_has_the_promised_keys():
    out = scepsy("simulate", "deep_research", "--plan", "deep_research", "--rate", "0.5", "--requests", "60", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in ("throughput_rps", "latency_mean_s", "latency_p50_s", "latency_p99_s", "completed", "llm_calls", "wall_s"):
        assert key in data
    assert data["completed"] == 60
    assert data["llm_calls"] > 60
    assert set(data["per_llm"]) == {"planner", "searcher", "writer"}


def test_simulate_human_output_is_a_table():
    out = scepsy("simulate", "rag_rerank", "--plan", "rag_rerank", "--rate", "1", "--requests", "40")
    assert out.returncode == 0, out.stderr
    for word in ("reranker", "generator", "throughput", "latency mean", "completed 40/40"):
        assert word in out.stdout


@pytest.mark.parametrize("args,needle", [
    (("simulate", "no_such_flow", "--plan", "x", "--rate", "1"), "no shipped workflow"),
    (("simulate", "deep_research", "--plan", "deep_research", "--rate", "0"), "--rate 0"),
])
def test_simulate_bad_input_is_a_clear_error(args, needle):
    out = scepsy(*args)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr


def test_the_readme_main_command_works_as_written():
    """The README's first command (run the main job on the embedded default) succeeds."""
    import re
    import shlex
    from pathlib import Path

    readme = Path("README.md").read_text()
    line = next(l for l in readme.splitlines() if "scepsy plan" in l and "&&" in l)
    cmd = shlex.split(re.sub(r"^.*\.venv/bin/scepsy ", "", line))
    out = scepsy(*cmd, "--requests", "60")
    assert out.returncode == 0, out.stderr
    assert "status optimal" in out.stdout and "simulated 60 requests" in out.stdout
    assert "placement" in out.stdout and "node1" in out.stdout
