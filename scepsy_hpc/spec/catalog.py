"""Model and GPU catalogs (DESIGN.md §3.2): `configs/models.yaml` and `configs/gpus.yaml`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, PositiveFloat, PositiveInt, RootModel, model_validator

from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.base import SpecModel
from scepsy_hpc.spec.source import load_yaml, validate

GIB = 1024**3


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
