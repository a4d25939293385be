"""Local sim engines (engine.local) started for real with a workflow's `llms` settings: the tool-call rate
decides whether a call that offers tools is answered with tool calls, and prefix caching can be off."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from scepsy_hpc.engine.local import SimEngineSpec, _command, sim_engines

pytestmark = pytest.mark.timeout(30)

MODEL = "llama-3.2-1b-instruct"
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
CALLS = 8


def _chat(url: str, n: int) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": f"question {n}: what is new?"}], "tools": TOOLS,
            "max_tokens": 16}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_a_rate_of_one_always_answers_tools_with_tool_calls_and_zero_never(tmp_path: Path) -> None:
    specs = [SimEngineSpec(MODEL, "h100-sxm", served_model_name="m", tool_call_rate=1.0),
             SimEngineSpec(MODEL, "h100-sxm", served_model_name="m", tool_call_rate=0.0, prefix_caching=False)]
    with sim_engines(specs, 0.02, tmp_path) as (always, never):
        for n in range(CALLS):
            choice = _chat(always.url, n)["choices"][0]
            assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"], choice
            choice = _chat(never.url, n)["choices"][0]
            assert choice["finish_reason"] in ("stop", "length") and not choice["message"].get("tool_calls"), choice
        assert "prefix caching on" in always.log_tail() and "prefix caching off" in never.log_tail()


def test_the_command_line_carries_the_settings_only_when_set() -> None:
    argv = _command(SimEngineSpec(MODEL, "h100-sxm", tool_call_rate=0.8, prefix_caching=False), 1234, "127.0.0.1",
                    1.0, 0)
    assert argv[argv.index("--tool-call-rate") + 1] == "0.8" and "--no-enable-prefix-caching" in argv
    plain = _command(SimEngineSpec(MODEL, "h100-sxm"), 1234, "127.0.0.1", 1.0, 0)
    assert "--tool-call-rate" not in plain and "--no-enable-prefix-caching" not in plain
