"""`status --watch`: the engines' load read from /metrics (vLLM's and SGLang's names), and the view of a live
deployment with traffic through the gateway (and its request cap, from `up --max-requests`)."""

from __future__ import annotations

import io
import re
import json
import urllib.request
from pathlib import Path
from typing import Any

from scepsy_hpc.service.watch import engine_load

VLLM = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.25
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{model_name="m"} 100.0
"""
SGLANG = """# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs 4.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs 1.0
# TYPE sglang:token_usage gauge
sglang:token_usage 0.5
"""


def test_engine_load_reads_vllm_and_sglang_gauges_and_nothing_else() -> None:
    assert engine_load(VLLM) == {"running": 3.0, "waiting": 2.0, "kv_use": 0.25}
    assert engine_load(SGLANG) == {"running": 4.0, "waiting": 1.0, "kv_use": 0.5}
    assert engine_load("not prometheus {{{") == {}


def test_watch_shows_each_llm_with_traffic_load_and_health(tmp_path: Path, state: Path, sv: Any) -> None:
    from rich.console import Console

    from scepsy_hpc.service.client import DaemonClient
    from scepsy_hpc.service.paths import StatePaths
    from scepsy_hpc.service.view import render

    assert sv.scepsy(state, "daemon", "start", "--poll", "0.5").returncode == 0
    assert sv.scepsy(state, "up", str(sv.small_plan(tmp_path / "p.yaml")), "--name", "w", "--detach",
                     "--time-scale", "0.05", "--max-requests", "7").returncode == 0
    doc = sv.wait_state(state, "w", "serving")
    for i in range(3):
        req = urllib.request.Request(f"{doc['base_url']}/chat/completions", method="POST",
                                     data=json.dumps({"model": "generator", "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": "x"}]}).encode(),
                                     headers={"Content-Type": "application/json", "X-Scepsy-Request": f"r{i}",
                                              "Authorization": f"Bearer {sv.owner_key(state, 'w')}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200
    watched = DaemonClient(StatePaths(state)).request("GET", "/v1/watch")
    (dep,) = watched["deployments"]
    gen = dep["llms"]["generator"]
    assert (gen["replicas"], gen["healthy"]) == (1, 1)
    assert gen["traffic"]["calls"] == 3 and gen["traffic"]["rate_rps_60s"] > 0
    assert gen["kv_use"] is not None and 0.0 <= gen["kv_use"] <= 1.0
    out = io.StringIO()
    Console(file=out, width=160).print(render(watched))
    text = out.getvalue()
    assert "w  serving" in text and "generator" in text and "1/1" in text and "reranker" in text
    # up --max-requests 7 reached the gateway: three requests admitted (in flight until they idle out, 3 s here)
    assert dep["requests"]["max_requests"] == 7 and dep["requests"]["admitted"] == 3, dep["requests"]
    assert re.search(r"requests in flight [0-3] of at most 7, 0 waiting; 0 waited, 0 refused \(503\)", text), text
