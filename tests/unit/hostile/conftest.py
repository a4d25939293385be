"""The hostile-input suite's runner: each case is `scepsy_hpc.cli.main(argv)` in a forked child under a
memory limit and a time limit, its output captured; the parent measures wall time and peak RSS."""

from __future__ import annotations

import importlib
import os
import resource
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest

# imported before forking, so each child starts warm (what `validate` and the flags' types use)
for _warm in ("scepsy_hpc.cli", "scepsy_hpc.commands.validate", "scepsy_hpc.perf.fit", "scepsy_hpc.spec.catalog",
              "scepsy_hpc.spec.cluster", "scepsy_hpc.spec.placement_check", "scepsy_hpc.spec.plan",
              "scepsy_hpc.spec.workflow"):
    importlib.import_module(_warm)

TIME_LIMIT_S = 5.0
MEMORY_LIMIT_B = 500 * 1024 * 1024


@dataclass(frozen=True)
class Outcome:
    """How one case ended."""

    status: int | None      # exit status, None if a signal ended it
    signal: int | None
    wall_s: float
    rss_growth_b: int
    stdout: str
    stderr: str


def _vsize_b() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _rss_b() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_forked(argv: list[str], env: dict[str, str] | None = None) -> Outcome:
    """`scepsy ARGV` in a forked child: address space = ours + 500 MB, killed after 5 s."""
    from scepsy_hpc.cli import main

    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    base_rss, limit_as = _rss_b(), _vsize_b() + MEMORY_LIMIT_B
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
            signal.alarm(int(TIME_LIMIT_S) + 2)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.environ.update(env or {})
            try:
                code = int(main(argv) or 0)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # a bug: shown as it would be to a user
                import traceback
                traceback.print_exc()
                code = 98
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    deadline = t0 + TIME_LIMIT_S + 1
    while True:
        wpid, status, usage = os.wait4(pid, os.WNOHANG)
        if wpid:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            wpid, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.005)
    wall = time.monotonic() - t0
    out.seek(0)
    err.seek(0)
    return Outcome(
        status=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        wall_s=wall, rss_growth_b=usage.ru_maxrss * 1024 - base_rss,
        stdout=out.read().decode("utf-8", "replace"), stderr=err.read().decode("utf-8", "replace"))


@pytest.fixture
def scepsy_forked():
    """The runner: `scepsy_forked(argv, env=None) -> Outcome`."""
    return run_forked


_HERE = __import__("pathlib").Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
import corpus_attacks  # noqa: E402
import corpus_cli  # noqa: E402
import corpus_specs  # noqa: E402


def all_cases() -> list:
    """The whole corpus, generated."""
    return [*corpus_attacks.yaml_attacks(), *corpus_attacks.workflow_attacks(), *corpus_attacks.cluster_attacks(),
            *corpus_attacks.plan_attacks(), *corpus_specs.mutations(), *corpus_cli.cli_cases()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise `hostile_case` with the corpus, ids `kind/name`."""
    if "hostile_case" in metafunc.fixturenames:
        cases = all_cases()
        metafunc.parametrize("hostile_case", cases, ids=[f"{c.kind}/{c.name}"[:80] for c in cases])


@pytest.fixture
def corpus():
    """The corpus module of spec mutations (bases, spec_case)."""
    return corpus_specs


@pytest.fixture
def repo_root():
    """The repository root (shipped configs are named relative to it)."""
    return _HERE.parents[2]


def kind_table() -> str:
    """Markdown table: kind → number of cases."""
    counts: dict[str, int] = {}
    for c in all_cases():
        counts[c.kind] = counts.get(c.kind, 0) + 1
    rows = [f"| {k} | {n} |" for k, n in sorted(counts.items())]
    return "\n".join(["| kind | cases |", "|---|---|", *rows, f"| **total** | **{sum(counts.values())}** |"])
