"""The layer order is a contract: `lint-imports` (pyproject's [tool.importlinter]) passes, and bites."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(*args: str) -> subprocess.CompletedProcess[str]:
    # --no-cache: nothing written into the checkout; PYTHONPATH: this checkout's package is analysed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_package_keeps_its_import_contracts() -> None:
    res = _lint()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_a_broken_layer_order_fails(tmp_path: Path) -> None:
    config = tmp_path / "contracts.toml"
    config.write_text('[tool.importlinter]\nroot_package = "scepsy_hpc"\n\n'
                      '[[tool.importlinter.contracts]]\nname = "sim below perf"\ntype = "layers"\n'
                      'layers = ["scepsy_hpc.perf", "scepsy_hpc.sim"]\n')
    res = _lint("--config", str(config))
    assert res.returncode != 0, res.stdout + res.stderr
    assert "BROKEN" in res.stdout and "scepsy_hpc.sim.core -> scepsy_hpc.perf" in res.stdout, res.stdout
