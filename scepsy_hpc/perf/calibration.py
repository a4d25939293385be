"""Published vLLM measurements the engine performance model is calibrated against.

Each point names its source and the number printed there; `predict(point, models, gpus)` gives the
model's value for the same scenario. `scripts/calibrate.py` prints the comparison and fits the
per-GPU efficiency constants of configs/gpus.yaml; tests/unit/perf/test_calibration.py checks that
every point holds within its tolerance.

Scenarios:
  batch_latency  vLLM `benchmark_latency`: one batch of `batch` prompts of `input` tokens, prefilled
                 together, then `output`−1 decode iterations; value = end-to-end seconds.
  tpot           steady decode at concurrency `batch` with `input`-token prompts, halfway through
                 `output` tokens; value = seconds per output token.
  ttft_batch     all prompts in `prompts` arrive at once and are prefilled in one iteration
                 (vLLM 0.5 without chunked prefill); value = seconds to the first token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scepsy_hpc.perf.model import EngineConfig, EnginePerf
from scepsy_hpc.spec.catalog import GPUSpec, ModelSpec

# Llama-2-70B (P14 predates Llama 3): same shape as Llama-3-70B but a 32k vocabulary.
LLAMA2_70B = ModelSpec(
    hf_id="meta-llama/Llama-2-70b-hf", params_b=68.98, layers=80, hidden=8192, intermediate=28672,
    heads=64, kv_heads=8, head_dim=128, vocab=32000, dtype_bytes=2, max_model_len=4096,
)

VLLM_CI_H100 = "vLLM performance-benchmark report (Buildkite), H100 run, archived at buildkite.com/elastic/enterprise-search-ruby/builds/571"
VLLM_CI_A100 = "vLLM performance-benchmark report (Buildkite), A100-SXM4-80GB run, archived at buildkite.com/julialang/opencl-dot-jl/builds/306"
VLLM_CI_H200 = "vLLM performance-benchmark report, buildkite.com/vllm/performance-benchmark/builds/9515"


@dataclass(frozen=True)
class CalibrationPoint:
    """One published measurement: scenario, configuration, the printed value and its source."""

    id: str
    model: str  # catalog key, or "llama-2-70b" for LLAMA2_70B
    gpu: str
    tp: int
    scenario: str
    batch: int
    input: int
    output: int
    measured: float  # seconds
    tolerance: float  # accepted relative error
    source: str
    quote: str
    prompts: tuple[int, ...] = field(default=())


POINTS: tuple[CalibrationPoint, ...] = (
    CalibrationPoint("P1", "llama-3.1-8b-instruct", "h100-sxm", 1, "batch_latency", 8, 32, 128, 0.997542, 0.12,
                     VLLM_CI_H100, "latency_llama8B_tp1 8xH100 997.542 (mean ms; bs 8, in 32, out 128)"),
    CalibrationPoint("P2", "llama-3.1-70b-instruct", "h100-sxm", 4, "batch_latency", 8, 32, 128, 2.44447, 0.12,
                     VLLM_CI_H100, "latency_llama70B_tp4 8xH100 2444.47"),
    CalibrationPoint("P3", "mixtral-8x7b-instruct", "h100-sxm", 2, "batch_latency", 8, 32, 128, 2.32697, 0.12,
                     VLLM_CI_H100, "latency_mixtral8x7B_tp2 8xH100 2326.97"),
    CalibrationPoint("P5", "llama-3.1-8b-instruct", "a100-80gb", 1, "batch_latency", 8, 32, 128, 1.58543, 0.12,
                     VLLM_CI_A100, "latency_llama8B_tp1 | A100-SXM4-80GB | 1585.43"),
    CalibrationPoint("P6a", "llama-3.1-8b-instruct", "h200", 1, "batch_latency", 8, 32, 128, 0.833421, 0.12,
                     VLLM_CI_H200, "latency_llama8B_tp1 | H200 | 833.421"),
    CalibrationPoint("P6b", "llama-3.1-70b-instruct", "h200", 4, "batch_latency", 8, 32, 128, 2.07753, 0.12,
                     VLLM_CI_H200, "latency_llama70B_tp4 | H200 | 2077.53"),
    CalibrationPoint("P6c", "mixtral-8x7b-instruct", "h200", 2, "batch_latency", 8, 32, 128, 1.91744, 0.12,
                     VLLM_CI_H200, "latency_mixtral8x7B_tp2 | H200 | 1917.44"),
    CalibrationPoint("P11", "llama-3.1-8b-instruct", "h100-sxm", 1, "tpot", 1, 100, 128, 0.00648, 0.15,
                     "InferenceBench concurrency sweep, vLLM 0.21.0, H100-80GB-HBM3 (yobitelcomm.github.io/bench/recipes/concurrency-sweep/)",
                     "conc 1: tpot_p50_ms 6.48"),
    CalibrationPoint("P12", "llama-3.1-8b-instruct", "a100-40gb", 1, "tpot", 1, 1024, 128, 1 / 75.0, 0.15,
                     "vLLM 0.23.0 sweep on A100 40GB, random 1024/128 (johnmusgrave.com/p/vllm-throughput-latency-sweep-on)",
                     "decode at one request per time runs at about 75 tokens/sec"),
    CalibrationPoint("P7", "mistral-7b-instruct-v0.3", "h100-sxm", 1, "tpot", 3, 200, 300, 0.00788, 0.15,
                     "LambdaLabsML/vllm-benchmark, vLLM 0.5.4, results/prompt_10/1xH100-80GB-SXM/Mistral-7B-Instruct-v0.3_tp1_len2000.json",
                     "median_itl_ms: 7.876673946157098 (10 ShareGPT prompts, live batch mostly 2-3)"),
    CalibrationPoint("P7t", "mistral-7b-instruct-v0.3", "h100-sxm", 1, "ttft_batch", 10, 0, 1, 0.0647, 0.40,
                     "LambdaLabsML/vllm-benchmark, same file as P7",
                     "median_ttft_ms: 64.71665995195508; input lengths [14, 30, 28, 12, 375, 29, 487, 369, 5, 236]",
                     prompts=(14, 30, 28, 12, 375, 29, 487, 369, 5, 236)),
    CalibrationPoint("P14", "llama-2-70b", "a100-80gb", 4, "batch_latency", 64, 256, 256, 14.57, 0.35,
                     "vllm-project/vllm PR #2192 (custom all-reduce), benchmark_latency -tp 4 --batch-size 64 --input-len 256 --output-len 256",
                     "| Llama 70B | A100-80G | 4 | 64 | 16.37 | 14.57 |"),
    # P14 and P7t come from vLLM 0.2 / 0.5.4, whose CPU-side overhead (API server 33 %, scheduler
    # 29 % of step time for Llama 3 8B on H100, per the vLLM v0.6.0 blog) the current engine has
    # removed; they are kept with a wider tolerance as a check on the compute and all-reduce terms.
)


def _model(point: CalibrationPoint, models: dict[str, ModelSpec]) -> ModelSpec:
    return LLAMA2_70B if point.model == "llama-2-70b" else models[point.model]


def predict(point: CalibrationPoint, models: dict[str, ModelSpec], gpus: dict[str, GPUSpec],
            gpu_override: GPUSpec | None = None) -> float:
    """The performance model's value (seconds) for a calibration point's scenario."""
    gpu = gpu_override or gpus[point.gpu]
    # benchmark_latency prefills the whole batch in one step: budget at least the batch's tokens.
    budget = max(8192, point.batch * point.input + 1, sum(point.prompts) + 1)
    perf = EnginePerf(EngineConfig(_model(point, models), gpu, tp=point.tp, max_batched_tokens=budget))
    if point.scenario == "batch_latency":
        prefill = perf.iteration_time(0, 0, [(point.input, 0)] * point.batch)
        series = perf.decode_series(point.batch, point.batch * (point.input + 1))
        return prefill + series.total(point.output - 1)
    if point.scenario == "tpot":
        ctx = point.batch * (point.input + point.output / 2)
        return perf.iteration_time(point.batch, ctx)
    if point.scenario == "ttft_batch":
        return perf.iteration_time(0, 0, [(p, 0) for p in point.prompts])
    raise ValueError(f"unknown calibration scenario {point.scenario!r}")
