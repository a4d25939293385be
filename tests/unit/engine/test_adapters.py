"""Engine adapters: rendered command lines and environments against golden files, and launch checks."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from scepsy_hpc.engine.adapters import (
    ENGINES,
    EngineLaunch,
    base_url,
    check_launch,
    engine_argv,
    engine_command,
    engine_env,
    health_url,
    parse_prefix,
    parser_fields,
    secret_env,
)
from scepsy_hpc.engine.sim_server import build_arg_parser, build_server
from scepsy_hpc.engine.sim_tools import DEFAULT_TOOL_RATE
from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.catalog import load_models

GOLDEN = Path(__file__).parent / "golden"
PY = "/opt/venv/bin/python"  # fixed, so that goldens do not depend on the machine
LLAMA_8B, LLAMA_70B = "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct"


def _launch(**kw) -> EngineLaunch:
    base = dict(engine="vllm", model="llama-3.1-8b-instruct", hf_id=LLAMA_8B, served_name="generator", gpu="h100-sxm")
    return EngineLaunch(**{**base, **kw})


SECRET = "job-secret"   # every golden is rendered with an engine secret: where it goes is part of the golden


def _render(launch: EngineLaunch, gpus: list[str], mps_pct: int = 100, prefix: str = "") -> str:
    env = {**engine_env(launch, gpus, mps_pct), **secret_env(launch, SECRET)}
    lines = ["# command", engine_command(launch, prefix, python=PY, secret=SECRET), "# env"]
    return "\n".join(lines + [f"{k}={v}" for k, v in sorted(env.items())]) + "\n"


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("SCEPSY_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing; run with SCEPSY_UPDATE_GOLDEN=1 and check it by hand"
    assert text == path.read_text()


MODELS = load_models()


def _from_catalog(engine: str, model: str, overrides: dict | None = None, **kw) -> EngineLaunch:
    """A launch whose parser flags come from configs/models.yaml (and `overrides`), as serve_config fills them."""
    spec = MODELS[model]
    return _launch(engine=engine, model=model, hf_id=spec.hf_id, **parser_fields(spec, engine, **(overrides or {})),
                   **kw)


CASES = {
    "vllm_tp4": (_from_catalog("vllm", "llama-3.1-70b-instruct", tp=4, port=8100), ["0", "1", "2", "3"], 100, ""),
    "vllm_qwen_tools": (_from_catalog("vllm", "qwen2.5-7b-instruct", port=8002), ["1"], 100, ""),
    "vllm_reasoning_template": (_launch(tool_call_parser="hermes", reasoning_parser="deepseek_r1",
                                        chat_template="/opt/templates/tool chat.jinja", port=8003), ["0"], 100, ""),
    "sglang_qwen_tools": (_from_catalog("sglang", "qwen2.5-7b-instruct",
                                        dict(reasoning_parser="qwen3", chat_template="/opt/t.jinja"), port=30001),
                          ["0"], 100, ""),
    "vllm_frac_mps": (_launch(gpu_frac=0.25, mem_frac=0.225, max_num_seqs=64, port=8001), ["2"], 25, ""),
    "vllm_dummy_apptainer": (_launch(dummy_weights=True, extra_args=("--max-model-len", "8192")), ["0"], 100,
                             "apptainer exec --nv /opt/images/vllm.sif"),
    "sglang_tp2": (_from_catalog("sglang", "llama-3.1-8b-instruct", tp=2, mem_frac=0.85, max_num_seqs=128,
                                 port=30000), ["4", "5"], 100, "module load cuda/12.4 &&"),
    "sim_time_scale": (_launch(engine="sim", gpu_frac=0.5, mem_frac=0.45, time_scale=0.02, seed=7, host="127.0.0.1",
                               port=18000), ["0"], 50, ""),
    # a workflow's llms settings: the sim engine's tool-call rate, prefix caching off (each engine's own flag)
    "sim_tool_rate_no_prefix_caching": (_launch(engine="sim", tool_call_rate=0.8, prefix_caching=False, port=18001),
                                        ["0"], 100, ""),
    "vllm_no_prefix_caching": (_launch(prefix_caching=False, tool_call_rate=0.8, dummy_weights=True, port=8004),
                               ["0"], 100, ""),
    "sglang_no_radix_cache": (_launch(engine="sglang", prefix_caching=False, tool_call_rate=0.8, port=30002), ["0"],
                              100, ""),
    "sglang_quoted_path": (_launch(engine="sglang", hf_id="/models/it's here/llama", served_name="gen;x"), ["0"], 100,
                           ""),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    launch, gpus, mps_pct, prefix = CASES[name]
    _check_golden(name, _render(launch, gpus, mps_pct, prefix))


def test_goldens_have_no_strays():
    assert {p.stem for p in GOLDEN.glob("*.txt")} == set(CASES)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_secret_goes_by_environment_where_the_engine_reads_one(engine):
    launch = _launch(engine=engine)
    argv, env = engine_argv(launch, python=PY, secret=SECRET), secret_env(launch, SECRET)
    if engine == "sglang":   # no environment variable for it: the one engine whose secret shows in ps
        assert argv[argv.index("--api-key") + 1] == SECRET and env == {}
    else:
        assert SECRET not in argv and env == {"vllm": {"VLLM_API_KEY": SECRET},
                                              "sim": {"SCEPSY_ENGINE_API_KEY": SECRET}}[engine]
    assert engine_argv(launch, python=PY) == [a for a in argv if a not in ("--api-key", SECRET)]
    assert secret_env(launch, None) == {} and secret_env(launch, "") == {}


def test_command_round_trips_through_shlex():
    launch = _launch(extra_args=("--max-model-len", "4096"))
    assert shlex.split(engine_command(launch, python=PY)) == engine_argv(launch, python=PY)


def test_hostile_hf_id_is_quoted_for_bash(tmp_path):
    launch = _launch(engine="sglang", hf_id="/models/it's here/llama $(touch pwned)`id`; rm -rf /", served_name="gen")
    line = engine_command(launch, python=PY)
    argv = engine_argv(launch, python=PY)
    assert shlex.split(line) == argv
    # bash sees exactly the argv words: print each on its own line instead of running PY.
    out = subprocess.run(["bash", "-c", f'printargs() {{ printf "%s\\n" "$@"; }}; printargs {line}'],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.splitlines() == argv
    assert list(tmp_path.iterdir()) == []  # the $(touch pwned) was not run
    assert argv[4] == launch.hf_id


def test_hostile_served_name_rejected():
    with pytest.raises(SpecError) as exc:
        engine_command(_launch(served_name="gen; rm -rf /"), python=PY)
    assert "'gen; rm -rf /'" in str(exc.value) and "whitespace" in str(exc.value)


@pytest.mark.parametrize("engine", ENGINES)
def test_extra_args_come_last_verbatim(engine):
    extra = ("--enable-prefix-caching", "--chat-template", "a b.jinja")
    argv = engine_argv(_launch(engine=engine, extra_args=extra), python=PY)
    assert tuple(argv[-3:]) == extra


@pytest.mark.parametrize("mem_frac, text", [(0.3 * 0.75, "0.225"), (1 / 3, "0.333333"), (0.9, "0.9"), (1.0, "1")])
def test_fractions_are_short(mem_frac, text):
    argv = engine_argv(_launch(mem_frac=mem_frac), python=PY)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == text


def test_sim_argv_parses_and_builds_a_server():
    launch = CASES["sim_time_scale"][0]
    argv = engine_argv(launch, python=PY)
    assert argv[:3] == [PY, "-m", "scepsy_hpc.engine.sim_server"]
    args = build_arg_parser().parse_args(argv[3:])
    assert (args.model, args.gpu, args.tp, args.gpu_frac) == ("llama-3.1-8b-instruct", "h100-sxm", 1, 0.5)
    assert (args.host, args.port, args.served_model_name) == ("127.0.0.1", 18000, "generator")
    assert (args.max_num_seqs, args.time_scale, args.seed) == (256, 0.02, 7)
    server = build_server(args)
    assert server.served_name == "generator" and server.time_scale == 0.02


def test_sim_argv_carries_the_workflows_tool_call_rate_and_prefix_caching_to_the_server():
    argv = engine_argv(CASES["sim_tool_rate_no_prefix_caching"][0], python=PY)
    server = build_server(build_arg_parser().parse_args(argv[3:]))
    assert (server.tool_call_rate, server.prefix_caching) == (0.8, False)
    default = build_server(build_arg_parser().parse_args(engine_argv(_launch(engine="sim"), python=PY)[3:]))
    assert (default.tool_call_rate, default.prefix_caching) == (DEFAULT_TOOL_RATE, True)
    # every digit the workflow gave, and 0 passed rather than dropped
    for rate, word in ((0.123456789, "0.123456789"), (0.0, "0.0"), (1, "1.0")):
        argv = engine_argv(_launch(engine="sim", tool_call_rate=rate), python=PY)
        assert argv[argv.index("--tool-call-rate") + 1] == word


def test_env_per_engine():
    assert engine_env(_launch(engine="sglang", tp=2), ["0", "1"]) == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert engine_env(_launch(engine="sim"), ["3"]) == {"CUDA_VISIBLE_DEVICES": "3"}
    frac = engine_env(_launch(engine="sglang", gpu_frac=0.5, mem_frac=0.4), ["1"], mps_pct=50)
    assert frac == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"}
    assert engine_env(_launch(), ["0"])["VLLM_NO_USAGE_STATS"] == "1"


def test_env_needs_one_gpu_per_tp_rank():
    with pytest.raises(SpecError) as exc:
        engine_env(_launch(tp=2), ["0"])
    assert "tp=2 was given 1 GPUs (0); give it exactly 2" in str(exc.value)


def test_env_rejects_bad_mps_pct():
    with pytest.raises(SpecError) as exc:
        engine_env(_launch(gpu_frac=0.5, mem_frac=0.4), ["0"], mps_pct=0)
    assert "MPS thread percentage 0 must be in 1..100" in str(exc.value)


def test_urls():
    launch = _launch(port=8123)
    assert base_url(launch, "gpu-node-07") == "http://gpu-node-07:8123"
    assert health_url(launch, "gpu-node-07") == "http://gpu-node-07:8123/health"
    assert health_url(launch, "fe80::1") == "http://[fe80::1]:8123/health"


@pytest.mark.parametrize("change, message", [
    (dict(engine="trtllm"), "unknown engine 'trtllm'; known engines: sim, vllm, sglang"),
    (dict(tp=3), "tp=3 must be a power of two in 1..16"),
    (dict(tp=32), "tp=32 must be a power of two in 1..16"),
    (dict(tp=0), "tp=0 must be a power of two in 1..16"),
    (dict(gpu_frac=0.0), "gpu_frac=0.0 must be in (0, 1]"),
    (dict(gpu_frac=1.5), "gpu_frac=1.5 must be in (0, 1]"),
    (dict(gpu_frac=0.5, mem_frac=0.4, tp=2), "gpu_frac=0.5 with tp=2: a GPU share is only possible at tp=1"),
    (dict(mem_frac=0.0), "mem_frac=0.0 must be in (0, 1]"),
    (dict(mem_frac=1.2), "mem_frac=1.2 must be in (0, 1]"),
    (dict(gpu_frac=0.25), "mem_frac=0.9 exceeds gpu_frac=0.25: engines sharing the GPU would together ask for "
                          "more memory than it has; set mem_frac <= 0.25"),
    (dict(port=0), "port=0 must be in 1..65535"),
    (dict(port=70000), "port=70000 must be in 1..65535"),
    (dict(max_num_seqs=0), "max_num_seqs=0 must be >= 1"),
    (dict(served_name=""), "served_name is empty"),
    (dict(served_name="gen\tx"), "served_name 'gen\\tx' contains whitespace or control characters"),
    (dict(served_name="gen\x1b[2J"), "served_name 'gen\\x1b[2J' contains whitespace or control characters"),
    (dict(hf_id=""), "hf_id is empty"),
    (dict(engine="sim", time_scale=0.0), "time_scale=0.0 must be > 0"),
    (dict(engine="sim", tool_call_rate=1.5), "tool_call_rate=1.5 must be in [0, 1] (the chance of answering a call "
                                             "that offers tools with tool calls); fix the workflow's llms.generator"),
    (dict(engine="sim", tool_call_rate=-0.1), "tool_call_rate=-0.1 must be in [0, 1]"),
    (dict(extra_args=("--x\0",)), "'--x\\x00' contains a NUL character"),
])
def test_check_launch_errors(change, message):
    with pytest.raises(SpecError) as exc:
        check_launch(_launch(**change))
    assert message in str(exc.value)


def test_check_launch_reports_every_problem():
    with pytest.raises(SpecError) as exc:
        check_launch(_launch(tp=3, port=0))
    assert len(exc.value.problems) == 2


def test_check_launch_accepts_valid():
    for launch, *_ in CASES.values():
        check_launch(launch)
    check_launch(dataclasses.replace(CASES["vllm_frac_mps"][0], mem_frac=0.25))  # mem_frac == gpu_frac is allowed


def test_parse_prefix():
    assert parse_prefix("  apptainer exec --nv /opt/images/vllm.sif ") == "apptainer exec --nv /opt/images/vllm.sif"
    assert parse_prefix("") == ""
    for bad in ("module load cuda\nrm -rf /", "a\rb", "a\0b"):
        with pytest.raises(SpecError) as exc:
            parse_prefix(bad)
        assert repr(bad) in str(exc.value)


def test_prefix_is_checked_by_engine_command():
    with pytest.raises(SpecError) as exc:
        engine_command(_launch(), prefix="module load x\n", python=PY)
    assert "must be one line" in str(exc.value)
