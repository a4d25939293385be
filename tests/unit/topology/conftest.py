"""The shared third-party topology captures (../shared/reference/topology-captures, never copied in):
`@pytest.mark.captures(kind, ...)` parametrises a test's `name` over the captures of those kinds in
EXPECTED.json, and the `capture` fixture reads one — skipping without them, failing in CI."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Callable

import pytest

CAPTURES = Path(__file__).resolve().parents[3].parent / "shared" / "reference" / "topology-captures"


@functools.lru_cache(maxsize=1)
def _expected() -> dict:
    path = CAPTURES / "EXPECTED.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "captures(*kinds): parametrise `name` over the shared captures of these kinds")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("captures")
    if marker is not None:
        names = sorted(n for n, e in _expected().items() if e["kind"] in marker.args)
        metafunc.parametrize("name", names or ["<captures missing>"])


@pytest.fixture
def capture() -> Callable[[str], tuple[str, dict]]:
    """read(name) → (the capture's text, its EXPECTED entry)."""
    def read(name: str) -> tuple[str, dict]:
        if not _expected():
            if os.environ.get("CI") == "true":
                pytest.fail(f"{CAPTURES} is missing; CI must provide the shared topology captures")
            pytest.skip(f"{CAPTURES} not present")
        return (CAPTURES / name).read_text(), _expected()[name]
    return read
