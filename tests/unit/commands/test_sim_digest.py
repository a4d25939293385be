"""scripts/sim_digest.py: the same simulator gives the same digests; a doctored earlier digest reads as a
difference (exit 1); a name that is not a shipped workflow is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "sim_digest.py"

pytestmark = pytest.mark.timeout(120)


def digest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=110)


def test_same_simulator_same_digests_and_a_changed_one_differs(tmp_path: Path) -> None:
    args = ["--plans", str(tmp_path / "plans"), "--workflows", "router_cascade", "--gpus", "4",
            "--requests", "30"]
    first = digest(*args)
    assert first.returncode == 0, first.stderr
    assert [p.name for p in (tmp_path / "plans").iterdir()] == ["router_cascade.yaml"]
    (line,) = first.stdout.splitlines()
    assert line.split()[0] == "router_cascade" and len(line.split()[1]) == 16
    before = tmp_path / "before.txt"
    before.write_text(first.stdout)
    again = digest(*args, "--against", str(before))
    assert again.returncode == 0 and again.stdout.strip() == line + "  same", again.stdout + again.stderr
    before.write_text("router_cascade 0123456789abcdef\n")
    changed = digest(*args, "--against", str(before))
    assert changed.returncode == 1
    assert "router_cascade" in changed.stdout and "DIFFERS (was 0123456789abcdef)" in changed.stdout
    assert "1 of 1 differ" in changed.stderr


def test_an_unknown_workflow_is_refused(tmp_path: Path) -> None:
    out = digest("--plans", str(tmp_path), "--workflows", "../etc/passwd")
    assert out.returncode == 2 and "not shipped workflows: ../etc/passwd" in out.stderr and "Traceback" not in out.stderr
