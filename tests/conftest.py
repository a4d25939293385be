"""Shared fixtures: the shipped catalogs (loaded once per session)."""

from __future__ import annotations

import pytest

from scepsy_hpc.spec.catalog import load_gpus, load_models


@pytest.fixture(scope="session")
def models():
    return load_models()


@pytest.fixture(scope="session")
def gpus():
    return load_gpus()
