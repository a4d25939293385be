"""Model and GPU catalogs: shipped files load, numbers match hand computations, bad files name a line."""

from __future__ import annotations

import pytest

from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.catalog import GIB, GPUSpec, ModelSpec, config_dir, load_gpus, load_models

REQUIRED_MODELS = [
    "llama-3.1-8b-instruct", "llama-3.1-70b-instruct", "qwen2.5-7b-instruct", "qwen2.5-14b-instruct",
    "qwen2.5-32b-instruct", "qwen2.5-72b-instruct", "mistral-7b-instruct-v0.3", "mixtral-8x7b-instruct",
]
REQUIRED_GPUS = ["a100-40gb", "a100-80gb", "h100-sxm", "h200", "l40s"]


@pytest.fixture(scope="module")
def models() -> dict[str, ModelSpec]:
    return load_models()


@pytest.fixture(scope="module")
def gpus() -> dict[str, GPUSpec]:
    return load_gpus()


# --- shipped catalogs -----------------------------------------------------------------------------

def test_default_paths_are_the_shipped_configs(models, gpus):
    assert config_dir().name == "configs"
    assert load_models(config_dir() / "models.yaml") == models
    assert load_gpus(config_dir() / "gpus.yaml") == gpus


@pytest.mark.parametrize("key", REQUIRED_MODELS)
def test_required_model_present(models, key):
    assert key in models
    assert isinstance(models[key], ModelSpec)


@pytest.mark.parametrize("key", REQUIRED_GPUS)
def test_required_gpu_present(gpus, key):
    assert key in gpus
    assert isinstance(gpus[key], GPUSpec)


@pytest.mark.parametrize("key", REQUIRED_MODELS)
def test_params_match_architecture(models, key):
    """params_b agrees (within 1.5%) with a count from the architecture numbers."""
    m = models[key]
    embed = m.vocab * m.hidden * (1 if m.tied_embeddings else 2)
    attn = 2 * m.hidden * m.heads * m.head_dim + 2 * m.hidden * m.kv_heads * m.head_dim
    mlp = 3 * m.hidden * m.intermediate * (m.experts or 1)
    total = embed + m.layers * (attn + mlp)
    assert total / 1e9 == pytest.approx(m.params_b, rel=0.015)


@pytest.mark.parametrize("key", REQUIRED_MODELS)
def test_model_consistency(models, key):
    m = models[key]
    assert m.heads % m.kv_heads == 0
    assert m.hidden % m.heads == 0 and m.head_dim == m.hidden // m.heads  # true for all required models
    assert m.dtype_bytes == 2
    assert m.max_model_len >= 8192
    assert m.hf_id.count("/") == 1


def test_llama_8b_derived_quantities(models):
    m = models["llama-3.1-8b-instruct"]
    assert m.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert m.weight_bytes == pytest.approx(8.03e9 * 2)
    assert m.embed_params == 128256 * 4096
    assert m.expert_params == 0.0
    # untied: both the embedding and the LM head are removed from the matmul count
    assert m.active_matmul_params == pytest.approx(8.03e9 - 2 * 128256 * 4096)


def test_llama_70b_kv_bytes(models):
    m = models["llama-3.1-70b-instruct"]
    assert m.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327680
    assert m.weight_bytes / GIB == pytest.approx(70.6e9 * 2 / 2**30)


def test_qwen_7b_kv_bytes(models):
    assert models["qwen2.5-7b-instruct"].kv_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57344


def test_mixtral_moe_quantities(models):
    m = models["mixtral-8x7b-instruct"]
    assert (m.experts, m.experts_per_token) == (8, 2)
    assert m.active_params_b == pytest.approx(12.9)
    assert m.expert_params == 32 * 8 * 3 * 4096 * 14336
    embed = 32000 * 4096
    assert m.embed_params == embed
    assert m.active_matmul_params == pytest.approx(12.9e9 - 2 * embed)
    assert 12.0e9 < m.active_matmul_params < 12.9e9
    # weights are all experts, not the active ones
    assert m.weight_bytes == pytest.approx(46.7e9 * 2)
    # active params agree with the architecture: attention + 2 of 8 experts + embeddings
    attn = 2 * 4096 * 4096 + 2 * 4096 * 8 * 128
    active = 2 * embed + 32 * (attn + 2 * 3 * 4096 * 14336)
    assert active / 1e9 == pytest.approx(12.9, rel=0.01)


def test_tied_embeddings_count_once():
    m = ModelSpec(hf_id="a/b", params_b=1.0, layers=1, hidden=100, intermediate=10, heads=4, kv_heads=2,
                  head_dim=25, vocab=1000, max_model_len=10, tied_embeddings=True)
    assert m.active_matmul_params == pytest.approx(1e9 - 100 * 1000)
    untied = m.model_copy(update={"tied_embeddings": False})
    assert untied.active_matmul_params == pytest.approx(1e9 - 2 * 100 * 1000)


@pytest.mark.parametrize("key", REQUIRED_GPUS)
def test_gpu_sanity(gpus, key):
    g = gpus[key]
    assert 0 < g.compute_eff <= 1 and 0 < g.mem_eff <= 1 and 0 < g.link_eff <= 1
    assert g.reserved_gib < g.mem_gib
    assert 100 < g.bf16_tflops < 2000
    assert 0.5 < g.hbm_tbps < 6


def test_gpu_catalog_numbers(gpus):
    assert gpus["a100-40gb"].mem_gib == pytest.approx(40537 / 1024, abs=0.01)
    assert gpus["a100-80gb"].mem_gib == pytest.approx(80.0)
    assert gpus["h100-sxm"].bf16_tflops == pytest.approx(1979 / 2, rel=0.001)
    assert gpus["h200"].mem_gib > gpus["h100-sxm"].mem_gib > gpus["a100-40gb"].mem_gib
    assert gpus["h200"].hbm_tbps == pytest.approx(4.8)
    assert gpus["l40s"].nvlink_gbps == 0.0


# --- bad catalog files ----------------------------------------------------------------------------

MODEL_OK = """\
# a tiny test model
tiny:
  hf_id: x/tiny
  params_b: 1.0
  layers: 2
  hidden: 64
  intermediate: 128
  heads: 4
  kv_heads: 2
  head_dim: 16
  vocab: 100
  max_model_len: 2048
"""

GPU_OK = """\
g1:
  mem_gib: 40
  bf16_tflops: 100
  hbm_tbps: 1.0
"""


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def _errors(loader, tmp_path, text, name="cat.yaml") -> tuple[str, list[str]]:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecError) as ei:
        loader(path)
    return str(path), ei.value.problems


def test_valid_temp_catalogs_load(tmp_path):
    (tmp_path / "m.yaml").write_text(MODEL_OK)
    (tmp_path / "g.yaml").write_text(GPU_OK)
    m = load_models(tmp_path / "m.yaml")
    assert list(m) == ["tiny"]
    assert m["tiny"].kv_bytes_per_token == 2 * 2 * 2 * 16 * 2
    g = load_gpus(str(tmp_path / "g.yaml"))
    assert g["g1"].mem_gib == 40
    assert g["g1"].compute_eff == 0.6  # default


def test_model_unknown_field_names_line(tmp_path):
    text = MODEL_OK + "  colour: red\n"
    path, problems = _errors(load_models, tmp_path, text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:{line_of(text, 'colour:')}: tiny.colour: "), problems
    assert "unknown key 'colour'" in problems[0]
    assert "kv_heads" in problems[0] and "hf_id" in problems[0]


def test_model_negative_value_names_line(tmp_path):
    text = MODEL_OK.replace("layers: 2", "layers: -2")
    path, problems = _errors(load_models, tmp_path, text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:{line_of(text, 'layers: -2')}: tiny.layers: "), problems
    assert "greater than 0" in problems[0] and "(got -2)" in problems[0]


def test_model_heads_not_multiple_of_kv_heads(tmp_path):
    text = MODEL_OK.replace("kv_heads: 2", "kv_heads: 3")
    path, problems = _errors(load_models, tmp_path, text)
    assert len(problems) == 1, problems
    # the entry's key line or the first line of its mapping
    assert any(problems[0].startswith(f"{path}:{n}: tiny: ") for n in (2, 3)), problems
    assert "heads (4) must be a multiple of kv_heads (3)" in problems[0]


def test_model_half_moe_rejected(tmp_path):
    text = MODEL_OK + "  experts: 8\n"
    _, problems = _errors(load_models, tmp_path, text)
    assert "experts_per_token" in problems[0]


def test_gpu_unknown_field_names_line(tmp_path):
    text = GPU_OK + "  speed: 1\n"
    path, problems = _errors(load_gpus, tmp_path, text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:{line_of(text, 'speed:')}: g1.speed: "), problems
    assert "unknown key 'speed'" in problems[0]
    assert "mem_gib" in problems[0] and "hbm_tbps" in problems[0]


def test_gpu_negative_value_names_line(tmp_path):
    text = GPU_OK.replace("mem_gib: 40", "mem_gib: -40")
    path, problems = _errors(load_gpus, tmp_path, text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:{line_of(text, 'mem_gib')}: g1.mem_gib: "), problems
    assert "(got -40)" in problems[0]


def test_gpu_efficiency_above_one(tmp_path):
    text = GPU_OK + "  compute_eff: 1.5\n"
    path, problems = _errors(load_gpus, tmp_path, text)
    assert problems[0].startswith(f"{path}:{line_of(text, 'compute_eff')}: g1.compute_eff: "), problems
    assert "less than or equal to 1" in problems[0]


def test_catalog_several_errors_reported(tmp_path):
    text = GPU_OK.replace("mem_gib: 40", "mem_gib: -40").replace("hbm_tbps: 1.0", "hbm_tbps: fast")
    path, problems = _errors(load_gpus, tmp_path, text)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{path}:2: g1.mem_gib")
    assert problems[1].startswith(f"{path}:4: g1.hbm_tbps")


@pytest.mark.parametrize("text,needle", [("", "empty"), ("[]\n", "non-empty mapping"), ("{}\n", "non-empty mapping")])
def test_catalog_not_a_mapping(tmp_path, text, needle):
    path, problems = _errors(load_gpus, tmp_path, text)
    assert problems[0].startswith(path)
    assert needle in problems[0]


def test_catalog_missing_file(tmp_path):
    with pytest.raises(SpecError) as ei:
        load_models(tmp_path / "nope.yaml")
    assert "no such file" in str(ei.value)
    assert "nope.yaml" in str(ei.value)
