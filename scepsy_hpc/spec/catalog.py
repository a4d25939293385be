"""Model and GPU catalogs (DESIGN.md §3.2): `configs/models.yaml` and `configs/gpus.yaml`."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, PositiveFloat, PositiveInt, RootModel, field_validator, model_validator

from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.base import SpecModel
from scepsy_hpc.spec.source import load_yaml, validate

GIB = 1024**3

# Parser names each engine registers, so that a typo in configs/models.yaml or a plan fails at load
# time, not when the first agent's request is refused. Read from the engines' own registries:
#   vLLM vllm-project/vllm@0064cc9cb1ae57b1308015d48a57462fa27a68f2 (main, newer than the 0.33.0 we
#     target): vllm/tool_parsers/__init__.py `_TOOL_PARSERS_TO_REGISTER` and
#     vllm/reasoning/__init__.py `_REASONING_PARSERS_TO_REGISTER`;
#   SGLang sgl-project/sglang@00828e568a0030e197c825dfa20f5a180b143d04 (main):
#     python/sglang/srt/function_call/function_call_parser.py `FunctionCallParser.ToolCallParserEnum`;
#     sglang@002e9bfc90a037dc912d3e8525dee06d5d789aa8 python/sglang/srt/parser/reasoning_parser.py
#     `ReasoningParser.DetectorMap`.
# A name newer than these lists is refused here; pass it with `--engine-arg` until it is added.
# The engines name one format differently (vLLM `llama3_json` = SGLang `llama3`, vLLM `deepseek_r1` =
# SGLang `deepseek-r1`), hence one name per engine.
KNOWN_TOOL_CALL_PARSERS: dict[str, frozenset[str]] = {
    "vllm": frozenset("""
        apertus cohere_command3 cohere_command4 deepseek_v3 deepseek_v31 deepseek_v32 deepseek_v4 ernie45
        functiongemma gemma4 gigachat3 glm45 glm47 granite granite-20b-fc granite4 hermes hunyuan_a13b hy_v3
        inkling internlm jamba kimi_k2 kimi_k3 lfm2 llama3_json llama4_json llama4_pythonic longcat mimo
        minicpm5 minimax_m2 minimax_m3 mistral olmo3 openai phi4_mini_json poolside_v1 pythonic qwen3_coder
        qwen3_xml seed_oss solar_open2 step3 step3p5 xlam""".split()),
    "sglang": frozenset("""
        apertus2509 cohere_command4 deepseekv3 deepseekv31 deepseekv32 deepseekv4 dots gemma4 gigachat3
        gigachat35 glm glm45 glm47 gpt-oss hermes hunyuan inkling interns1 k2_horizon kimi_k2 kimi_k3 lfm2
        ling3 llama3 mimo minicpm5 minimax-m2 minimax-m3 mistral muse poolside_v1 pythonic qwen qwen25
        qwen3_coder spark25 step3 step3p5 trinity""".split()),
}
KNOWN_REASONING_PARSERS: dict[str, frozenset[str]] = {
    "vllm": frozenset("""
        cohere_command3 cohere_command4 deepseek_r1 deepseek_v3 deepseek_v4 ernie45 gemma4 glm45 glm47
        granite holo2 hunyuan_a13b hy_v3 inkling kimi_k2 kimi_k3 mimo minimax_m2 minimax_m2_append_think
        minimax_m3 mistral nemotron_v3 olmo3 openai_gptoss poolside_v1 qwen3 seed_oss solar_open2 step3
        step3p5""".split()),
    "sglang": frozenset("""
        deepseek-r1 deepseek-v3 gemma4 glm45 gpt-oss interns1 kimi kimi_k2 mimo minimax minimax-append-think
        mistral nemotron_3 qwen3 qwen3-thinking step3 step3p5""".split()),
}
PARSER_ENGINES = ("vllm", "sglang")


class _EngineParser(SpecModel):
    """One output parser of a model, by its name in each engine's registry (an engine left out: none)."""

    _known: ClassVar[dict[str, frozenset[str]]]
    _what: ClassVar[str]

    vllm: str | None = None  # the name vLLM's `--<what>` takes
    sglang: str | None = None  # the name SGLang's `--<what>` takes

    @model_validator(mode="before")
    @classmethod
    def _per_engine(cls, data: Any) -> Any:
        if isinstance(data, str):
            raise ValueError(f"give the {cls._what} per engine, e.g. {{vllm: {data}, sglang: ...}}: the engines "
                             f"name one format differently (vLLM llama3_json is SGLang llama3)")
        return data

    @field_validator("vllm", "sglang")
    @classmethod
    def _known_name(cls, name: str | None, info: Any) -> str | None:
        known = cls._known[info.field_name]
        if name is not None and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{name!r} is not a {cls._what} {info.field_name} knows; {hint}known: "
                             f"{', '.join(sorted(known))}")
        return name

    @model_validator(mode="after")
    def _some_engine(self) -> "_EngineParser":
        if self.vllm is None and self.sglang is None:
            raise ValueError(f"name the {self._what} for vllm, sglang or both (or leave the key out)")
        return self

    def name_for(self, engine: str) -> str | None:
        """The parser's name for `engine` (None: that engine gets none)."""
        return getattr(self, engine) if engine in PARSER_ENGINES else None


class ToolCallParser(_EngineParser):
    """`--tool-call-parser` per engine (vLLM also gets `--enable-auto-tool-choice`)."""

    _known = KNOWN_TOOL_CALL_PARSERS
    _what = "tool-call parser"


class ReasoningParser(_EngineParser):
    """`--reasoning-parser` per engine, for models that think before they answer."""

    _known = KNOWN_REASONING_PARSERS
    _what = "reasoning parser"


def check_chat_template(value: str) -> str:
    """A chat template as one command-line word: non-empty, one line, no control characters."""
    if not value.strip() or any(not c.isprintable() for c in value):
        raise ValueError(f"chat_template {value!r} must be a non-empty path or template name on one line "
                         f"without control characters")
    return value


class ModelSpec(SpecModel):
    """Architecture of one model, from its published config.json (sizes in parameters, not bytes)."""

    hf_id: str
    params_b: PositiveFloat
    active_params_b: PositiveFloat | None = None
    layers: PositiveInt
    hidden: PositiveInt
    intermediate: PositiveInt
    heads: PositiveInt
    kv_heads: PositiveInt
    head_dim: PositiveInt
    vocab: PositiveInt
    dtype_bytes: Annotated[int, Field(ge=1, le=4)] = 2
    max_model_len: PositiveInt
    experts: PositiveInt | None = None
    experts_per_token: PositiveInt | None = None
    tied_embeddings: bool = False
    # Agent traffic (tools=[...]): vLLM refuses tool_choice "auto" unless it runs with a tool-call parser.
    tool_call_parser: ToolCallParser | None = None  # how the engine finds tool calls in the model's output
    reasoning_parser: ReasoningParser | None = None  # how it splits reasoning from the answer; thinking models only
    # A path or template name the engine takes instead of tokenizer_config.json's template; only for models
    # whose own template cannot render tool messages. A relative path is read from the engine's cwd.
    chat_template: str | None = None

    @field_validator("chat_template")
    @classmethod
    def _one_word(cls, value: str | None) -> str | None:
        return value if value is None else check_chat_template(value)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if (self.experts is None) != (self.experts_per_token is None):
            raise ValueError("give both experts and experts_per_token (MoE) or neither")
        if self.experts and self.experts_per_token > self.experts:
            raise ValueError(f"experts_per_token ({self.experts_per_token}) exceeds experts ({self.experts})")
        if self.active_params_b and self.active_params_b > self.params_b:
            raise ValueError(f"active_params_b ({self.active_params_b}) exceeds params_b ({self.params_b})")
        return self

    @property
    def weight_bytes(self) -> float:
        """Bytes of all weights."""
        return self.params_b * 1e9 * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token over all layers (K and V)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def embed_params(self) -> float:
        """Parameters of the input embedding (a lookup, not a matmul)."""
        return float(self.vocab * self.hidden)

    @property
    def expert_params(self) -> float:
        """Parameters in all routed experts (0 for dense models): gate, up and down per expert."""
        if not self.experts:
            return 0.0
        return float(self.layers * self.experts * 3 * self.hidden * self.intermediate)

    @property
    def active_matmul_params(self) -> float:
        """Matmul parameters one token passes through, LM head excluded."""
        total = (self.active_params_b or self.params_b) * 1e9
        lm_head = 0.0 if self.tied_embeddings else self.embed_params
        return max(total - self.embed_params - lm_head, 0.0)


class GPUSpec(SpecModel):
    """One GPU type: datasheet peaks plus calibrated efficiency factors (see configs/gpus.yaml)."""

    mem_gib: PositiveFloat
    bf16_tflops: PositiveFloat
    hbm_tbps: PositiveFloat
    nvlink_gbps: Annotated[float, Field(ge=0)] = 0.0
    pcie_gbps: PositiveFloat = 32.0
    # Calibrated against published vLLM measurements (tests/unit/perf/test_calibration.py).
    compute_eff: Annotated[float, Field(gt=0, le=1)] = 0.6
    mem_eff: Annotated[float, Field(gt=0, le=1)] = 0.8
    iter_overhead_ms: Annotated[float, Field(ge=0)] = 2.0
    allreduce_latency_us: Annotated[float, Field(ge=0)] = 10.0
    link_eff: Annotated[float, Field(gt=0, le=1)] = 0.7
    reserved_gib: Annotated[float, Field(ge=0)] = 2.0


class _Models(RootModel[dict[str, ModelSpec]]):
    pass


class _GPUs(RootModel[dict[str, GPUSpec]]):
    pass


def config_dir() -> Path:
    """Directory of the bundled configs: $SCEPSY_CONFIG_DIR, else `configs/` beside the package."""
    env = os.environ.get("SCEPSY_CONFIG_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "configs"


def shipped_names(kind: str, chosen: str | None = None) -> list[str]:
    """The shipped configs of `kind` (e.g. "workflows") by name, or those of the comma-separated `chosen`; a
    SpecError names one that is not shipped and the names that are."""
    shipped = sorted(p.stem for p in (config_dir() / kind).glob("*.yaml"))
    if chosen is None:
        return shipped
    names = [w.strip() for w in chosen.split(",") if w.strip()]
    bad = [w for w in names if w not in shipped]
    what = kind[:-1] if kind.endswith("s") else kind
    if not names:
        raise SpecError(f"{chosen!r} names no {what}; choose from {', '.join(shipped)}")
    if bad:
        raise SpecError(f"no shipped {what} {bad[0]!r}; choose from {', '.join(shipped)}")
    return names


def resolve_input(arg: str, kind: str) -> Path:
    """A path as given, or the name of a shipped file under configs/<kind>/ (kind: workflows, plans, clusters)."""
    p = Path(arg)
    if p.exists() or p.suffix in (".yaml", ".yml"):
        return p
    shipped = config_dir() / kind / f"{arg}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(q.stem for q in (config_dir() / kind).glob("*.yaml"))
    raise SpecError(f"{arg}: no such file, and no shipped {kind[:-1]} of that name; shipped: {', '.join(names) or 'none'}")


def _load_catalog(path: Path, root: type[Any], what: str) -> dict[str, Any]:
    data, smap = load_yaml(path)
    if not isinstance(data, dict) or not data:
        raise SpecError(f"{path}:1: a {what} catalog is a non-empty mapping of name -> fields")
    return dict(validate(root, data, smap).root)


def load_models(path: str | Path | None = None) -> dict[str, ModelSpec]:
    """The model catalog (default `configs/models.yaml`)."""
    return _load_catalog(Path(path) if path else config_dir() / "models.yaml", _Models, "model")


def load_gpus(path: str | Path | None = None) -> dict[str, GPUSpec]:
    """The GPU catalog (default `configs/gpus.yaml`)."""
    return _load_catalog(Path(path) if path else config_dir() / "gpus.yaml", _GPUs, "GPU")
