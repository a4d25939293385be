"""Shared fixtures: the shipped catalogs (loaded once per session); a private profile cache for the session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

from scepsy_hpc.spec.catalog import load_gpus, load_models

# Synthetic profiles are cached per user on disk (predict.profile_cache). The tests share one cache of their
# own for the session (the CLIs they start inherit it), never the user's.
os.environ["SCEPSY_PROFILE_CACHE"] = tempfile.mkdtemp(prefix="scepsy-test-profiles-")
# ... removed when the session ends (one was left in /tmp per run)
atexit.register(shutil.rmtree, os.environ["SCEPSY_PROFILE_CACHE"], True)


@pytest.fixture(scope="session")
def models():
    return load_models()


@pytest.fixture(scope="session")
def gpus():
    return load_gpus()
