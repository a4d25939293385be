"""Simulated engines for the end-to-end drive tests: started once for the module's tests, always stopped."""

from __future__ import annotations

import pytest

from scepsy_hpc.engine.local import SimEngineSpec, start_sim_engines, stop_engines

TIME_SCALE = 0.02  # 50x faster than the modelled H100: calls last milliseconds, yet fan-outs still overlap
MODELS = ("llama-3.2-1b-instruct", "llama-3.2-3b-instruct", "qwen2.5-1.5b-instruct")


@pytest.fixture(scope="module")
def time_scale() -> float:
    """The time scale the engines (and so the gateways and drivers) run at."""
    return TIME_SCALE


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, str]:
    """Served model name -> engine base URL, one sim engine per small model."""
    engs = start_sim_engines([SimEngineSpec(model=m, gpu="h100-sxm", test_hooks=True) for m in MODELS], TIME_SCALE,
                             tmp_path_factory.mktemp("engine-logs"))
    try:
        yield {e.spec.served_name: e.url for e in engs}
    finally:
        stop_engines(engs)
