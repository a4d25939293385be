"""Continuity on the real local Slurm, each scenario under a steady load through the gateway (issue 20's
"Done when"): scripts/bench_continuity.py runs the scenario and prints its figures; these tests hold the
figures to what a user is promised.

Each scenario takes one to eight minutes (Slurm's walltime is counted in minutes): all are `slow`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]


def bench(scenario: str, *extra: str, timeout_s: float = 900.0) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_continuity.py"), "--scenario", scenario,
                           "--json", *extra], capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    try:
        row = json.loads(done.stdout)["scenarios"][0]
    except (ValueError, KeyError, IndexError):
        pytest.fail(f"bench_continuity.py --scenario {scenario} printed no row ({done.returncode}):\n"
                    f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    print(json.dumps(row, indent=1))
    assert "error" not in row, (f"{row.get('error')}\n{row.get('events_tail')}\nstatus: "
                                f"{json.dumps(row.get('status'))[-3000:]}\ndaemon.log: {row.get('daemon_log_tail')}\n"
                                f"gateway.log: {row.get('gateway_log_tail')}")
    return row


@pytest.mark.timeout(1200)
def test_walltime_three_minutes_driven_for_seven_cut_over_twice_failing_nothing() -> None:
    row = bench("walltime", timeout_s=1100)
    assert row["failed"] == 0, row["failures"]
    assert row["cutovers"] >= 4, row   # two nodes, at least twice each
    assert min(row["min_capacity"].values()) >= 1, row["min_capacity"]   # never zero healthy replicas of an LLM
    assert max(row["longest_gap_s"].values()) < 5.0, row["longest_gap_s"]


@pytest.mark.timeout(1200)
def test_without_room_for_two_copies_nodes_are_replaced_one_by_one_failing_nothing() -> None:
    row = bench("no-room", "--drive-s", "240", timeout_s=900)   # one round, node by node, ends within 4 minutes
    assert row["failed"] == 0, row["failures"]
    assert row["no_room_said"] and row["cutovers"] >= 2, row
    assert min(row["min_capacity"].values()) >= 1, row["min_capacity"]


@pytest.mark.timeout(600)
def test_an_engine_killed_fails_at_most_its_calls_in_flight_and_capacity_returns_within_30_s() -> None:
    row = bench("engine-crash", timeout_s=500)
    assert row["failed"] <= row["in_flight_at_kill"], row
    assert row["failed_after_recovery"] == 0 and row["restarts"] == 1
    assert row["recovery_s"] < 30.0, row


@pytest.mark.timeout(600)
def test_a_wedged_engine_is_detected_and_restarted() -> None:
    row = bench("wedged", timeout_s=500)
    assert row["restart_said"] and row["detected_s"] < row["stall_timeout_s"] + 15, row


@pytest.mark.timeout(600)
def test_a_node_set_down_is_excluded_and_its_engines_placed_on_another_node_within_60_s_plus_the_queue() -> None:
    row = bench("lost-node", timeout_s=500)
    assert row["node"] in row["excluded"] and row["node"] not in row["nodes_after"], row
    assert row["orphans"] == [], row   # a job Slurm requeued off the node is not left to come back
    assert row["within_60s_plus_queue"], row
    assert row["failed"] == 0, row["failures"]


@pytest.mark.timeout(900)
def test_outside_scancels_are_resubmitted_until_the_breaker_opens() -> None:
    row = bench("scancel", timeout_s=800)
    assert row["events"] == {"resubmit": 2, "breaker-open": 1}, row["events"]
    assert "circuit breaker open after 2 resubmission(s)" in row["breaker_error"]
    assert row["failed_before_breaker"] == 0, row


@pytest.mark.timeout(900)
def test_a_daemon_killed_during_a_cutover_completes_it_with_nothing_duplicated_or_orphaned() -> None:
    row = bench("daemon-kill", timeout_s=800)
    assert row["duplicates"] == 0 and row["orphans"] == [], row
    assert row["failed"] == 0, row["failures"]
