"""The one memory-fit check and the engine configuration of an allocation entry."""

from __future__ import annotations

import pytest

from scepsy_hpc.errors import InfeasibleError
from scepsy_hpc.perf.fit import MIN_KV_TOKENS, check_fit, engine_config
from scepsy_hpc.perf.model import EngineConfig, EnginePerf
from scepsy_hpc.spec.plan import LLMAlloc


def test_a_model_that_does_not_fit_says_what_to_change(models, gpus):
    perf = EnginePerf(EngineConfig(models["llama-3.1-70b-instruct"], gpus["a100-40gb"], tp=1))
    with pytest.raises(InfeasibleError) as ei:
        check_fit(perf.cfg, min_kv_tokens=256, label="LLM 'planner'")
    msg = str(ei.value)
    assert "LLM 'planner'" in msg and "GiB" in msg and "raise tp" in msg


def test_check_fit_returns_the_performance_model_of_a_fitting_config(models, gpus):
    cfg = engine_config(LLMAlloc(tp=1, max_num_seqs=32), models["llama-3.1-8b-instruct"], gpus["h100-sxm"])
    perf = check_fit(cfg)
    assert cfg.max_num_seqs == 32 and perf.kv_capacity_tokens >= MIN_KV_TOKENS
