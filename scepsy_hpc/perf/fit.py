"""Whether a configuration fits in memory, and the engine configuration an allocation entry describes.

A configuration fits when its share of GPU memory holds the weights plus a KV cache of at least
`MIN_KV_TOKENS` tokens. Every place that asks (plan validation, candidate configurations, profiling
jobs, the simulator, the simulated engine server, `scepsy trace`'s default allocation) asks
`check_fit`, so they all agree on what fits.
"""

from __future__ import annotations

from typing import Any

from scepsy_hpc.errors import InfeasibleError
from scepsy_hpc.perf.model import EngineConfig, EnginePerf
from scepsy_hpc.spec.catalog import GIB, GPUSpec, ModelSpec
from scepsy_hpc.spec.plan import LLMAlloc

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
