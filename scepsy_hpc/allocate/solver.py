"""One way to run HiGHS through PuLP: quietly, with its failures translated.

highspy ≥ 1.16 prints a banner ("Running HiGHS … Copyright …") from C++ onto file descriptor 1 the
first time a `Highs` object is made in a process, whatever `output_flag` says afterwards. That
banner broke every `--json` output. Python-level redirection cannot catch it, so the solve runs with
fd 1 pointed at /dev/null and restored afterwards (Python's own buffered stdout is flushed first so
nothing of ours is lost). A lock keeps two solving threads from restoring each other's fd.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Iterator

from scepsy_hpc.errors import SolverError

_FD_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_stdout_fd() -> Iterator[None]:
    """Point the process's file descriptor 1 at /dev/null for the duration (C-level output only)."""
    with _FD_LOCK:
        try:
            sys.stdout.flush()
        except (ValueError, OSError):  # a closed or broken stdout: nothing of ours to keep
            pass
        try:
            saved = os.dup(1)
        except OSError:  # no fd 1 at all (a daemon with closed stdio): nothing to guard
            yield
            return
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 1)
            finally:
                os.close(devnull)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def solve_highs(prob: Any, what: str, *, time_limit_s: float | None = None, gap: float | None = None,
                msg: bool = False) -> None:
    """Solve a PuLP problem with HiGHS; solver output never reaches stdout unless `msg` (then to stderr)."""
    import pulp

    options: dict[str, Any] = {"msg": msg}
    if time_limit_s is not None:
        options["timeLimit"] = time_limit_s
    if gap is not None:
        options["gapRel"] = gap
    try:
        if msg:  # asked-for solver logs go to stderr, so stdout stays the program's own
            with contextlib.redirect_stdout(sys.stderr), _fd1_to_stderr():
                prob.solve(pulp.HiGHS(**options))
        else:
            with quiet_stdout_fd():
                prob.solve(pulp.HiGHS(**options))
    except pulp.PulpSolverError as e:
        raise SolverError(f"HiGHS failed on the {what}: {e}") from None


@contextlib.contextmanager
def _fd1_to_stderr() -> Iterator[None]:
    """Point fd 1 at fd 2 for the duration, so a C library's log lands on stderr."""
    with _FD_LOCK:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            os.dup2(2, 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
