"""Whether a configuration fits in memory, and the engine configuration an allocation entry describes.

A configuration fits when its share of GPU memory holds the weights plus a KV cache of at least
`MIN_KV_TOKENS` tokens. Every place that asks (plan validation, candidate configurations, profiling
jobs, the simulator, the simulated engine server, `scepsy trace`'s default allocation) asks
`check_fit`, so they all agree on what fits.
"""

from __future__ import annotations

from typing import Any, Sequence

from scepsy_hpc.errors import InfeasibleError
from scepsy_hpc.perf.model import EngineConfig, EnginePerf
from scepsy_hpc.spec.catalog import GIB, GPUSpec, ModelSpec
from scepsy_hpc.spec.plan import Entry, LLMAlloc, groups_of

MIN_KV_TOKENS = 256  # the smallest KV cache worth starting an engine for: one short call


def engine_config(alloc: LLMAlloc, model: ModelSpec, gpu: GPUSpec) -> EngineConfig:
    """The engine configuration an allocation entry describes."""
    kw: dict[str, Any] = {}
    if alloc.max_num_seqs is not None:
        kw["max_num_seqs"] = alloc.max_num_seqs
    if alloc.max_batched_tokens is not None:
        kw["max_batched_tokens"] = alloc.max_batched_tokens
    return EngineConfig(model, gpu, tp=alloc.tp, gpu_frac=alloc.gpu_frac, **kw)


def check_fit(cfg: EngineConfig, *, min_kv_tokens: int = MIN_KV_TOKENS, label: str = "") -> EnginePerf:
    """`cfg`'s performance model; InfeasibleError when its memory cannot hold the weights and
    `min_kv_tokens` KV tokens (the message says how much is missing and what to raise)."""
    perf = EnginePerf(cfg)
    if perf.kv_capacity_tokens < min_kv_tokens:
        need = (cfg.model.weight_bytes + min_kv_tokens * perf.kv_bytes_per_token) / GIB
        have = cfg.tp * (cfg.gpu_frac * cfg.gpu.mem_gib * cfg.mem_util - cfg.gpu.reserved_gib)
        raise InfeasibleError(
            f"{label or cfg.model.hf_id}: tp={cfg.tp} gpu_frac={cfg.gpu_frac:g} gives {have:.1f} GiB for weights and KV "
            f"but needs {need:.1f} GiB ({cfg.model.weight_bytes / GIB:.1f} GiB weights + {min_kv_tokens} KV tokens); "
            f"raise tp or gpu_frac"
        )
    return perf


# The call a capacity estimate prices when the plan gives none: a mid-sized agent step.
REF_PROMPT, REF_OUTPUT = 1024, 128


def estimated_capacity_rps(perf: EnginePerf, prompt: int = REF_PROMPT, output: int = REF_OUTPUT) -> float:
    """Calls/s one engine carries at capacity for calls of `prompt` + `output` tokens, from the roofline
    model: a full batch (max_num_seqs, or what the KV cache holds) prefilled, then decoded together."""
    batch = max(1, min(perf.cfg.max_num_seqs, perf.kv_capacity_tokens // (prompt + output)))
    t = batch * perf.prefill_time(prompt) + (output - 1) * perf.iteration_time(batch, batch * (prompt + output / 2))
    return batch / t if t > 0 else 0.0


def group_weights(entry: Entry, model: ModelSpec, gpu: GPUSpec) -> list[float]:
    """Each configuration's routing weight (calls/s one replica carries): the plan's `capacity_rps` when every
    configuration has one, else the performance model's estimate for all of them (weights of one LLM are
    compared with each other only, so they must come from one source)."""
    groups = groups_of(entry)
    if all(g.capacity_rps is not None for g in groups):
        return [float(g.capacity_rps) for g in groups]  # type: ignore[arg-type]
    return [estimated_capacity_rps(EnginePerf(engine_config(g, model, gpu))) for g in groups]


def replica_weights(entry: Entry, model: ModelSpec, gpu: GPUSpec) -> list[float]:
    """Each replica's routing weight, by replica number; all 1.0 for a single configuration (like replicas
    share calls evenly, whatever the estimate)."""
    groups = groups_of(entry)
    if len(groups) == 1:
        return [1.0] * groups[0].replicas
    weights: Sequence[float] = group_weights(entry, model, gpu)
    return [w for g, w in zip(groups, weights) for _ in range(g.replicas)]
