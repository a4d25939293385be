"""The per-user disk cache of synthetic profiles: same profiles, made once, never another user's or a bad file."""

from __future__ import annotations

import json
import os

import pytest

from scepsy_hpc.predict import profile_cache
from scepsy_hpc.predict.inputs import ProfileSource, sample_mix, sample_program
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import load_workflow


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    d = tmp_path / "profiles"
    monkeypatch.setenv(profile_cache.ENV, str(d))
    return d


def _source(models, gpus, seed=0):
    wf = load_workflow("tests/data/small_rag.yaml", models)
    return ProfileSource(wf, models, gpus, sample_mix(sample_program(wf, 100, 0)), None, seed=seed, n_calls=300)


def test_a_profile_is_made_once_and_read_back_the_same(cache, models, gpus, monkeypatch):
    first = _source(models, gpus).get("answer", LLMAlloc(tp=2), "h100-sxm")
    files = list(cache.glob("*.json"))
    assert len(files) == 1 and oct(files[0].stat().st_mode & 0o777) == "0o600"
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    from scepsy_hpc.profile import synthetic

    monkeypatch.setattr(synthetic, "synthetic_profile", lambda *a, **k: pytest.fail("made again"))
    import scepsy_hpc.predict.inputs as inputs
    monkeypatch.setattr(inputs, "synthetic_profile", lambda *a, **k: pytest.fail("made again"))
    again = _source(models, gpus).get("answer", LLMAlloc(tp=2), "h100-sxm")
    assert again.points == first.points and again.capacity_rps == first.capacity_rps
    assert [p.latency_mean_s for p in again.points] == [p.latency_mean_s for p in first.points]


def test_other_inputs_miss_the_cache(cache, models, gpus):
    _source(models, gpus).get("answer", LLMAlloc(tp=2), "h100-sxm")
    _source(models, gpus, seed=1).get("answer", LLMAlloc(tp=2), "h100-sxm")
    _source(models, gpus).get("answer", LLMAlloc(tp=1), "h100-sxm")
    assert len(list(cache.glob("*.json"))) == 3


def test_a_bad_or_foreign_entry_is_made_again(cache, models, gpus):
    first = _source(models, gpus).get("answer", LLMAlloc(tp=2), "h100-sxm")
    (path,) = cache.glob("*.json")
    path.write_text("{not json")
    assert _source(models, gpus).get("answer", LLMAlloc(tp=2), "h100-sxm").points == first.points
    assert json.loads(path.read_text())["kind"] == "profile"      # rewritten
    os.chmod(cache, 0o777)                                        # others may write the directory: not used
    assert profile_cache.load(path.stem) is None
    os.chmod(cache, 0o700)
    assert profile_cache.load(path.stem) is not None


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch, models, gpus):
    monkeypatch.setenv(profile_cache.ENV, "off")
    assert profile_cache.cache_dir() is None
    _source(models, gpus).get("answer", LLMAlloc(tp=2), "h100-sxm")
    monkeypatch.delenv(profile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert profile_cache.cache_dir() == tmp_path / "xdg" / "scepsy" / "profiles"


def test_a_full_cache_drops_its_oldest_entries(cache, monkeypatch):
    monkeypatch.setattr(profile_cache, "MAX_ENTRIES", 10)
    cache.mkdir(mode=0o700)
    for i in range(11):
        p = cache / f"{i:02d}.json"
        p.write_text("{}")
        os.utime(p, (1000 + i, 1000 + i))
    profile_cache._trim(cache)
    assert sorted(p.stem for p in cache.glob("*.json")) == [f"{i:02d}" for i in range(2, 11)]
