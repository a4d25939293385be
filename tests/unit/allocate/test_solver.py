"""The HiGHS runner keeps C-level output off stdout and restores file descriptor 1 afterwards."""

from __future__ import annotations

import os

import pytest

from scepsy_hpc.allocate.solver import quiet_stdout_fd, solve_highs
from scepsy_hpc.errors import SolverError


def test_c_level_writes_to_fd1_are_swallowed_and_fd1_is_restored(capfd):
    print("before", flush=True)
    with quiet_stdout_fd():
        os.write(1, b"Running HiGHS 9.9.9 (git hash: x): Copyright\n")
    os.write(1, b"after\n")
    out = capfd.readouterr().out
    assert out == "before\nafter\n"


def test_a_solve_prints_nothing_on_stdout_and_solves(capfd):
    import pulp

    prob = pulp.LpProblem("t", pulp.LpMaximize)
    x = prob.add_variable("x", 0, 3, cat="Integer")
    prob += x
    prob += 2 * x <= 5
    solve_highs(prob, "test MILP", time_limit_s=10)
    assert pulp.LpStatus[prob.status] == "Optimal" and x.value() == pytest.approx(2)
    assert capfd.readouterr().out == ""


def test_solver_failure_is_a_solver_error(monkeypatch):
    import pulp

    def boom(self, *a, **k):
        raise pulp.PulpSolverError("no HiGHS")

    monkeypatch.setattr(pulp.LpProblem, "solve", boom)
    prob = pulp.LpProblem("t", pulp.LpMinimize)
    with pytest.raises(SolverError) as info:
        solve_highs(prob, "allocation MILP")
    assert "HiGHS failed on the allocation MILP: no HiGHS" in str(info.value)
