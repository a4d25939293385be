"""`scepsy validate` as a user runs it (a real subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def scepsy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_validate_accepts_every_shipped_file():
    import glob

    files = sorted(glob.glob("configs/workflows/*.yaml", root_dir=ROOT) + glob.glob("configs/plans/*.yaml", root_dir=ROOT)
                   + glob.glob("configs/clusters/*.yaml", root_dir=ROOT) + ["configs/models.yaml", "configs/gpus.yaml"])
    out = scepsy("validate", *files)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": ok (") == len(files)


def test_validate_reports_every_problem_with_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nllms:\n  a: {model: llama-3.1-8b-instruct}\nprogram:\n  - {call: b, prompt_tokens: 1, output_tokens: 1}\n"
                   "  - {tool: web}\n")
    out = scepsy("validate", str(bad))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert any(line.startswith(f"{bad}:5:") and "unknown LLM 'b'" in line for line in lines)
    assert any(line.startswith(f"{bad}:6:") and "unknown tool 'web'" in line for line in lines)
    assert "Traceback" not in out.stderr
