"""The hostile-input suite: every case (see corpus_*.py) is refused with exit 2, a message naming the
file and line (or the flag), no traceback, in under 5 s and 500 MB; the valid bases are accepted."""

from __future__ import annotations

import re

import pytest

MEMORY_LIMIT_B = 500 * 1024 * 1024
TIME_LIMIT_S = 5.0


def _materialise(case, tmp_path):
    for name, data in case.files.items():
        (tmp_path / name).write_bytes(data)
    return [a.replace("{dir}", str(tmp_path)) for a in case.argv]


def test_hostile_case_is_refused_clearly(hostile_case, tmp_path, scepsy_forked, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    argv = _materialise(hostile_case, tmp_path)
    out = scepsy_forked(argv, env=dict(hostile_case.env))
    text = out.stdout + out.stderr
    assert out.signal is None, f"killed by signal {out.signal} after {out.wall_s:.1f} s"
    assert "Traceback" not in text, text[-3000:]
    assert out.status == 2, f"exit {out.status}: {text[-2000:]}"
    assert out.wall_s < TIME_LIMIT_S
    assert out.rss_growth_b < MEMORY_LIMIT_B
    if hostile_case.kind.startswith("cli-"):
        flag = argv[-2]
        assert f"argument {flag}" in out.stderr, out.stderr
        return
    files = [a for a in argv if a.startswith(str(tmp_path)) or a == "/dev/zero"]
    named = [f for f in files if f in out.stderr]
    assert named, f"no file named in: {out.stderr[-1500:]}"
    if hostile_case.line:
        assert any(re.search(re.escape(f) + r":\d+", out.stderr) for f in named), out.stderr[-1500:]


@pytest.mark.parametrize("base", ["workflow", "plan", "cluster", "models", "gpus"])
def test_the_bases_of_the_mutations_are_valid(base, tmp_path, scepsy_forked, repo_root, monkeypatch, corpus):
    monkeypatch.chdir(repo_root)
    case = corpus.spec_case("base", base, base, corpus.BASES[base])
    out = scepsy_forked(_materialise(case, tmp_path))
    assert out.status == 0, out.stderr
    assert ": ok (" in out.stdout
