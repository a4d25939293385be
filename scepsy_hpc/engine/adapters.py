"""Engine adapters: one engine instance of a serving plan as command line, environment and URLs.

Three engines speak the same OpenAI-compatible HTTP API and serve `/health`: `vllm`, `sglang` and
`sim` (scepsy_hpc.engine.sim_server, the stand-in where there is no GPU). DESIGN.md §6.

Engine secret: an engine started with the job's secret answers /v1 (and the sim engine /scepsy) only to
`Authorization: Bearer SECRET`; /health and /metrics stay open (the agent's probes, Prometheus). The
secret goes by environment wherever the engine reads one (`secret_env`), so that it never shows in `ps`
(a process's environment is readable by its owner and root only); `secret_argv` is the rest.

Output parsers: agents send `tools=[...]`, and vLLM answers tool_choice "auto" only when started with
`--enable-auto-tool-choice --tool-call-parser NAME`. The name is the model's (configs/models.yaml
`tool_call_parser`, one name per engine), as are `--reasoning-parser` and `--chat-template`;
`parser_fields` fills them into a launch, and a plan's allocation can override each. The sim engine
takes none of them.

Workflow settings (`llms: {NAME: {tool_call_rate, prefix_caching}}`): `prefix_caching: false` gives each
engine its off switch (PREFIX_CACHING_OFF); `tool_call_rate` is the sim engine's --tool-call-rate, which
real engines have no use for. Both leave the command line as it was when left at their defaults.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.catalog import KNOWN_REASONING_PARSERS, KNOWN_TOOL_CALL_PARSERS, check_chat_template

if TYPE_CHECKING:
    from scepsy_hpc.spec.catalog import ModelSpec

ENGINES = ("sim", "vllm", "sglang")
TP_DEGREES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class EngineLaunch:
    """One engine instance to start."""

    engine: str  # one of ENGINES
    model: str  # key of configs/models.yaml (the sim engine's --model)
    hf_id: str  # what vllm/sglang load (ModelSpec.hf_id), or a local path
    served_name: str  # the name clients send (the workflow's LLM name)
    gpu: str  # key of configs/gpus.yaml (sim engine's --gpu)
    tp: int = 1
    gpu_frac: float = 1.0
    mem_frac: float = 0.9  # vLLM --gpu-memory-utilization / SGLang --mem-fraction-static
    max_num_seqs: int = 256
    port: int = 8000
    host: str = "127.0.0.1"  # the address it binds (the agent sets the node's cluster address)
    dummy_weights: bool = False  # profiling: random weights (--load-format dummy)
    time_scale: float = 1.0  # sim only
    seed: int = 0  # sim only
    tool_call_rate: float | None = None  # sim only: --tool-call-rate (None: the sim engine's default)
    prefix_caching: bool = True  # False: the engine's flag that turns prefix caching off (PREFIX_CACHING_OFF)
    # vllm/sglang only, named as that engine's registry names them (see `parser_fields`):
    tool_call_parser: str | None = None  # --tool-call-parser (vLLM: with --enable-auto-tool-choice)
    reasoning_parser: str | None = None  # --reasoning-parser
    chat_template: str | None = None  # --chat-template: a path (read from the engine's cwd) or a name
    extra_args: tuple[str, ...] = ()  # appended verbatim (user-supplied engine flags)


# Each engine's flag that turns its automatic prefix caching off (all three cache by default): vLLM's
# --enable-prefix-caching is a BooleanOptionalAction (vLLM >= 0.6), SGLang's radix cache has only an off switch.
PREFIX_CACHING_OFF = {"vllm": "--no-enable-prefix-caching", "sglang": "--disable-radix-cache",
                      "sim": "--no-enable-prefix-caching"}

PARSER_OFF = "none"   # a plan's or the CLI's value that turns the catalog's parser (or template) off
PARSER_FIELDS = ("tool_call_parser", "reasoning_parser", "chat_template")


def parser_fields(model: "ModelSpec", engine: str, *, tool_call_parser: str | None = None,
                  reasoning_parser: str | None = None, chat_template: str | None = None) -> dict[str, str | None]:
    """EngineLaunch's parser fields for `model` served by `engine`: the catalog's, each given one overriding it
    (`none` turns the catalog's off: an engine without tool calling answers `tools` with an error, as vLLM does).

    The overrides are names for `engine` (a plan is served by one engine); the sim engine gets none."""
    if engine not in KNOWN_TOOL_CALL_PARSERS:
        return {"tool_call_parser": None, "reasoning_parser": None, "chat_template": None}
    tool = model.tool_call_parser.name_for(engine) if model.tool_call_parser else None
    reasoning = model.reasoning_parser.name_for(engine) if model.reasoning_parser else None

    def pick(given: str | None, default: str | None) -> str | None:
        return default if given is None else (None if given == PARSER_OFF else given)

    return {"tool_call_parser": pick(tool_call_parser, tool), "reasoning_parser": pick(reasoning_parser, reasoning),
            "chat_template": pick(chat_template, model.chat_template)}


def _num(x: float) -> str:
    """A float as a short command-line word (0.225, not 0.22500000000000001)."""
    return f"{x:g}"


def check_launch(launch: EngineLaunch) -> None:
    """Raise SpecError listing every problem of `launch` (value, limit and fix)."""
    ln, problems = launch, []
    who = f"engine {ln.served_name!r}"
    if ln.engine not in ENGINES:
        problems.append(f"{who}: unknown engine {ln.engine!r}; known engines: {', '.join(ENGINES)}")
    if ln.tp not in TP_DEGREES:
        problems.append(f"{who}: tp={ln.tp} must be a power of two in 1..16 ({', '.join(map(str, TP_DEGREES))})")
    if not 0 < ln.gpu_frac <= 1:
        problems.append(f"{who}: gpu_frac={ln.gpu_frac} must be in (0, 1]; use 1.0 for a whole GPU")
    elif ln.gpu_frac < 1 and ln.tp > 1:
        problems.append(f"{who}: gpu_frac={ln.gpu_frac} with tp={ln.tp}: a GPU share is only possible at tp=1; "
                        f"use gpu_frac=1.0 or tp=1")
    if not 0 < ln.mem_frac <= 1:
        problems.append(f"{who}: mem_frac={ln.mem_frac} must be in (0, 1]")
    elif 0 < ln.gpu_frac <= 1 and ln.mem_frac > ln.gpu_frac:
        problems.append(f"{who}: mem_frac={ln.mem_frac} exceeds gpu_frac={ln.gpu_frac}: engines sharing the GPU "
                        f"would together ask for more memory than it has; set mem_frac <= {ln.gpu_frac}")
    if not 1 <= ln.port <= 65535:
        problems.append(f"{who}: port={ln.port} must be in 1..65535")
    if ln.max_num_seqs < 1:
        problems.append(f"{who}: max_num_seqs={ln.max_num_seqs} must be >= 1")
    if not ln.served_name:
        problems.append("served_name is empty; set it to the LLM name clients send")
    elif any(c.isspace() or not c.isprintable() for c in ln.served_name):
        problems.append(f"served_name {ln.served_name!r} contains whitespace or control characters; "
                        f"use a name like 'generator' or 'prm-7b'")
    if ln.engine in ("vllm", "sglang") and not ln.hf_id:
        problems.append(f"{who}: hf_id is empty; set the Hugging Face id or local path of the weights")
    if ln.engine == "sim" and not ln.time_scale > 0:
        problems.append(f"{who}: time_scale={ln.time_scale} must be > 0")
    if ln.tool_call_rate is not None and not 0 <= ln.tool_call_rate <= 1:
        problems.append(f"{who}: tool_call_rate={ln.tool_call_rate} must be in [0, 1] (the chance of answering "
                        f"a call that offers tools with tool calls); fix the workflow's llms.{ln.served_name}")
    if ln.engine in KNOWN_TOOL_CALL_PARSERS:
        problems += _parser_problems(ln, who)
    # A NUL cannot be passed in an argv word at all; exec would fail far from here.
    for word in (ln.hf_id, ln.model, ln.gpu, ln.host, *ln.extra_args):
        if "\0" in word:
            problems.append(f"{who}: {word!r} contains a NUL character")
    if problems:
        raise SpecError(problems)


def _parser_problems(ln: EngineLaunch, who: str) -> list[str]:
    """Parser names unknown to the launch's engine, and a chat template that is not one argv word."""
    problems = []
    for flag, name, known in (("tool_call_parser", ln.tool_call_parser, KNOWN_TOOL_CALL_PARSERS[ln.engine]),
                              ("reasoning_parser", ln.reasoning_parser, KNOWN_REASONING_PARSERS[ln.engine])):
        if name is not None and name not in known:
            problems.append(f"{who}: {flag}={name!r} is not a name {ln.engine} registers; known: "
                            f"{', '.join(sorted(known))}. Fix the plan or configs/models.yaml; a parser newer "
                            f"than this list can be given with --engine-arg")
    if ln.chat_template is not None:
        try:
            check_chat_template(ln.chat_template)
        except ValueError as exc:
            problems.append(f"{who}: {exc}")
    return problems


def _parser_argv(ln: EngineLaunch) -> list[str]:
    """--tool-call-parser, --reasoning-parser and --chat-template: the same flag names in vLLM and SGLang."""
    argv = ["--tool-call-parser", ln.tool_call_parser] if ln.tool_call_parser else []
    argv += ["--reasoning-parser", ln.reasoning_parser] if ln.reasoning_parser else []
    return argv + (["--chat-template", ln.chat_template] if ln.chat_template else [])


def _vllm_argv(ln: EngineLaunch) -> list[str]:
    """`vllm serve` argv."""
    # Memory share and batch size are always explicit: vLLM's default of 0.9 per instance makes the
    # second of two co-located engines fail its free-memory check at start-up.
    # No --disable-log-requests: request logging is off by default and vLLM 0.12 removed the flag.
    argv = ["vllm", "serve", ln.hf_id, "--tensor-parallel-size", str(ln.tp),
            "--gpu-memory-utilization", _num(ln.mem_frac), "--max-num-seqs", str(ln.max_num_seqs),
            "--host", ln.host, "--port", str(ln.port), "--served-model-name", ln.served_name]
    # Without --enable-auto-tool-choice a parser alone still refuses tool_choice "auto" (vLLM's request check).
    argv += ["--enable-auto-tool-choice"] if ln.tool_call_parser else []
    argv += _parser_argv(ln)
    return argv + _prefix_argv(ln) + (["--load-format", "dummy"] if ln.dummy_weights else [])


def _prefix_argv(ln: EngineLaunch) -> list[str]:
    """The engine's prefix-caching switch, only when caching is off (on is every engine's default)."""
    return [] if ln.prefix_caching else [PREFIX_CACHING_OFF[ln.engine]]


def _sglang_argv(ln: EngineLaunch, python: str) -> list[str]:
    """`python -m sglang.launch_server` argv."""
    # Same reason as vLLM: SGLang's default static memory share assumes it owns the whole GPU.
    argv = [python, "-m", "sglang.launch_server", "--model-path", ln.hf_id, "--tp-size", str(ln.tp),
            "--mem-fraction-static", _num(ln.mem_frac), "--max-running-requests", str(ln.max_num_seqs),
            "--host", ln.host, "--port", str(ln.port), "--served-model-name", ln.served_name]
    # SGLang has no --enable-auto-tool-choice: a tool-call parser is enough.
    argv += _parser_argv(ln)
    return argv + _prefix_argv(ln) + (["--load-format", "dummy"] if ln.dummy_weights else [])


def _sim_argv(ln: EngineLaunch, python: str) -> list[str]:
    """`python -m scepsy_hpc.engine.sim_server` argv (the GPU share stands for the memory share)."""
    return [python, "-m", "scepsy_hpc.engine.sim_server", "--model", ln.model, "--gpu", ln.gpu,
            "--tp", str(ln.tp), "--gpu-frac", _num(ln.gpu_frac), "--host", ln.host, "--port", str(ln.port),
            "--served-model-name", ln.served_name, "--max-num-seqs", str(ln.max_num_seqs),
            "--time-scale", _num(ln.time_scale), "--seed", str(ln.seed)] + sim_behaviour_argv(
                ln.tool_call_rate, ln.prefix_caching)


def sim_behaviour_argv(tool_call_rate: float | None, prefix_caching: bool) -> list[str]:
    """The sim engine's --tool-call-rate (when set) and --no-enable-prefix-caching (when off): the workflow's
    `llms` settings, as the launcher and the local engines (engine.local) pass them."""
    # repr, not _num: a rate keeps every digit the workflow gave
    argv = ["--tool-call-rate", repr(float(tool_call_rate))] if tool_call_rate is not None else []
    return argv + ([] if prefix_caching else [PREFIX_CACHING_OFF["sim"]])


# The variable each engine reads its API key from (vLLM: vllm.envs.VLLM_API_KEY, used when --api-key is absent).
SECRET_ENV = {"vllm": "VLLM_API_KEY", "sim": "SCEPSY_ENGINE_API_KEY"}


def secret_env(launch: EngineLaunch, secret: str | None) -> dict[str, str]:
    """The environment that gives the engine its secret ({} without one, or where the engine reads none)."""
    name = SECRET_ENV.get(launch.engine)
    return {name: secret} if secret and name else {}


def secret_argv(launch: EngineLaunch, secret: str | None) -> list[str]:
    """The words that give the engine its secret on its command line: SGLang only.

    SGLang's ServerArgs.api_key comes from `--api-key` alone: no release reads an environment variable
    for it (sgl-project/sglang PR #36358, SGLANG_API_KEY, is still open), so there the secret shows in
    `ps` to other users of the node for as long as the engine runs. Where that matters, serve with vLLM."""
    if secret and launch.engine == "sglang":
        return ["--api-key", secret]
    return []


def engine_argv(launch: EngineLaunch, python: str = sys.executable, secret: str | None = None) -> list[str]:
    """The engine's argv (no prefix), with `secret_argv`; SpecError if `launch` is invalid."""
    check_launch(launch)
    if launch.engine == "vllm":
        argv = _vllm_argv(launch)
    elif launch.engine == "sglang":
        argv = _sglang_argv(launch, python)
    else:
        argv = _sim_argv(launch, python)
    return argv + secret_argv(launch, secret) + list(launch.extra_args)


def parse_prefix(text: str) -> str:
    """A user's launch prefix, stripped; SpecError if it spans lines or holds a NUL."""
    if any(c in text for c in "\n\r\0"):
        raise SpecError(f"launch prefix {text!r} must be one line without NUL characters; "
                        f"join commands with '&&' (e.g. 'module load cuda/12.4 &&')")
    return text.strip()


def engine_command(launch: EngineLaunch, prefix: str = "", python: str = sys.executable,
                   secret: str | None = None) -> str:
    """One shell line: the launch prefix verbatim (the user quotes it), then every argv word quoted."""
    line = shlex.join(engine_argv(launch, python, secret))
    prefix = parse_prefix(prefix)
    return f"{prefix} {line}" if prefix else line


def engine_env(launch: EngineLaunch, gpus: Sequence[str], mps_pct: int = 100) -> dict[str, str]:
    """Variables to add to the environment of this engine, which runs on `gpus`."""
    if len(gpus) != launch.tp:
        raise SpecError(f"engine {launch.served_name!r} at tp={launch.tp} was given {len(gpus)} GPUs "
                        f"({', '.join(gpus) or 'none'}); give it exactly {launch.tp}")
    if not 1 <= mps_pct <= 100:
        raise SpecError(f"engine {launch.served_name!r}: MPS thread percentage {mps_pct} must be in 1..100")
    env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    if launch.gpu_frac < 1:
        # Read by the MPS client at CUDA init: caps this engine's share of the GPU's SMs.
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(mps_pct)
    if launch.engine == "vllm":
        env["VLLM_NO_USAGE_STATS"] = "1"  # compute nodes are offline; the usage report would only time out
    return env


def base_url(launch: EngineLaunch, host: str) -> str:
    """The engine's root URL (no /v1)."""
    # An IPv6 literal must be bracketed in a URL.
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{launch.port}"


def health_url(launch: EngineLaunch, host: str) -> str:
    """The URL that answers 200 once the engine serves (all three engines serve /health)."""
    return f"{base_url(launch, host)}/health"
