"""`scepsy simulate` as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def scepsy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", *args], capture_output=True, text=True, timeout=120)


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
    (("simulate", "deep_research", "--plan", "deep_research", "--rate", "0"), "argument --rate: 0"),
])
def test_simulate_bad_input_is_a_clear_error(args, needle):
    out = scepsy(*args)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr


def test_simulate_with_a_request_cap_says_what_held():
    out = scepsy("simulate", "rag_rerank", "--plan", "rag_rerank", "--rate", "20", "--requests", "60",
                 "--max-requests", "3", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["max_requests"] == 3 and data["held_requests"] > 0 and data["held_mean_s"] > 0
    text = scepsy("simulate", "rag_rerank", "--plan", "rag_rerank", "--rate", "20", "--requests", "60",
                  "--max-requests", "3")
    assert text.returncode == 0 and "at most 3 requests in flight" in text.stdout
    bad = scepsy("simulate", "rag_rerank", "--plan", "rag_rerank", "--rate", "1", "--max-requests", "0")
    assert bad.returncode == 2 and "--max-requests" in bad.stderr and "Traceback" not in bad.stderr
