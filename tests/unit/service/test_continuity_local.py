"""Continuity on the local backend, under a steady load through the gateway: walltime cut-overs (with room:
make before break; without: node by node), and a daemon killed in the middle of a cut-over.

The local backend ends a job at its walltime like Slurm (TIMEOUT); `LocalBackend(nodes=…)` answers
`nodes()` like a cluster of that shape, so the daemon in these tests sees no room for a second copy.
The same scenarios on the real local Slurm: tests/integration/test_slurm_continuity.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from scepsy_hpc.drive.steady import SteadyLoad, gaps, summary

pytestmark = pytest.mark.slow
LLMS = ("generator", "rewriter", "reranker")


def two_copy_plan(path: Path) -> Path:
    """rag_rerank with every LLM on both nodes (three GPUs each): a node can go while the other serves all three."""
    placement = []
    for replica, node in enumerate(("node1", "node2")):
        placement += [{"llm": "generator", "replica": replica, "node": node, "gpus": [0, 1]},
                      {"llm": "rewriter", "replica": replica, "node": node, "gpus": [2]},
                      {"llm": "reranker", "replica": replica, "node": node, "gpus": [2]}]
    path.write_text(yaml.safe_dump({
        "workflow": "rag_rerank", "gpus": {"type": "h100-sxm", "count": 6},
        "allocation": {"generator": {"tp": 2, "replicas": 2}, "rewriter": {"gpu_frac": 0.5, "replicas": 2},
                       "reranker": {"gpu_frac": 0.5, "replicas": 2}},
        "placement": placement}))
    return path


def events(sv: Any, state: Path, name: str) -> list[dict[str, Any]]:
    done = sv.scepsy(state, "events", name, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def kinds(evs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["kind"] == kind]


def owner_key(state: Path, name: str) -> str:
    """The owner key `up` made for deployment `name` (its owner.key: the daemon may run in this event loop)."""
    return (state / "deployments" / name / "owner.key").read_text().strip()


async def drive_until(base: str, stop: Any, timeout_s: float, rps: float = 6.0, *, key: str) -> list[Any]:
    """A steady load over the three LLMs until `stop()` holds (checked every second) or `timeout_s`; its records."""
    load = SteadyLoad(base, LLMS, rps, stream_share=0.5, max_tokens=8, timeout_s=60.0, api_key=key)
    await load.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not await asyncio.to_thread(stop):
            await asyncio.sleep(1.0)
    finally:
        records = await load.stop()
    return records


async def test_walltime_cutovers_under_load_fail_no_call_and_leave_no_llm_without_an_engine(
        tmp_path: Path, state: Path, sv: Any) -> None:
    assert sv.scepsy(state, "daemon", "start", "--poll", "0.5").returncode == 0
    up = sv.scepsy(state, "up", str(sv.small_plan(tmp_path / "p.yaml")), "--name", "wt", "--detach", "--time-scale",
                   "0.05", "--time", "0:40", "--cutover-margin", "4", "--drain-grace", "10")
    assert up.returncode == 0, up.stderr
    doc = sv.wait_state(state, "wt", "serving")
    first_jobs = set(doc["job_ids"])
    cont = doc["continuity"]
    assert cont["walltime_end"] and cont["next_cutover"] < cont["walltime_end"]
    assert cont["lead_s"] == pytest.approx(cont["queue_wait_s"] + cont["time_to_healthy_s"] + 4.0, abs=0.01)

    def two_rounds() -> bool:
        return len(kinds(events(sv, state, "wt"), "cutover-done")) >= 4   # two nodes, twice each

    records = await drive_until(f"{doc['gateway_url']}/d/wt/v1", two_rounds, timeout_s=150,
                                  key=owner_key(state, "wt"))
    evs = events(sv, state, "wt")
    done = kinds(evs, "cutover-done")
    assert len(done) >= 4, [e["detail"] for e in evs][-40:]
    s = summary(records)
    assert s["sent"] > 300 and s["failed"] == 0, s
    for llm in LLMS:   # every LLM answered all along: no moment without an engine taking its calls
        assert gaps(records, llm).length_s < 3.0, (llm, gaps(records, llm))
    for kind in ("cutover-start", "drain", "drained", "replica-added"):
        assert kinds(evs, kind), kind
    after = sv.status(state, "wt")
    assert after["state"] == "serving" and not first_jobs & {j["job_id"] for j in after["jobs"] if j["ended"] is None}
    assert all(j["state"] == "CANCELLED" for j in after["jobs"] if j["job_id"] in first_jobs)   # cut over, not timed out
    assert all(e["time"] and e["kind"] and e["detail"] for e in evs)


async def test_without_room_for_two_copies_nodes_are_replaced_one_at_a_time_failing_no_call(
        tmp_path: Path, state: Path) -> None:
    from scepsy_hpc.backend.local import LocalBackend
    from scepsy_hpc.service.daemon import Daemon
    from scepsy_hpc.service.deploy import UpRequest
    from scepsy_hpc.service.paths import StatePaths

    paths = StatePaths(state)
    paths.ensure()
    backend = LocalBackend(paths.local_jobs, nodes={"node1": 3, "node2": 3})   # the plan fills both: no room
    daemon = Daemon(paths, poll_s=0.5, backends={"local": backend})
    task = asyncio.create_task(daemon.run())
    try:
        while daemon._http is None:
            await asyncio.sleep(0.05)
        await daemon.up(UpRequest(name="nr", target=str(two_copy_plan(tmp_path / "p.yaml")), time_scale=0.05,
                                  time="0:45", cutover_margin_s=4.0, drain_grace_s=10.0))

        def state_of() -> str:
            d = daemon.store.get_deployment("nr")
            return d.state if d else ""

        deadline = time.monotonic() + 60
        while state_of() != "serving" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert state_of() == "serving", [e.message for e in daemon.store.events("nr")][-20:]

        def replaced_both() -> bool:
            return len([e for e in daemon.store.events("nr") if e.kind == "cutover-done"]) >= 2

        records = await drive_until(f"{daemon.gateway.url}/d/nr/v1", replaced_both, timeout_s=120,
                                  key=owner_key(state, "nr"))
        evs = daemon.store.events("nr")
        said = [f"{e.kind}: {e.message}" for e in evs]
        assert replaced_both(), said[-40:]
        s = summary(records)
        assert s["failed"] == 0 and s["sent"] > 150, s
        starts = [e for e in evs if e.kind == "cutover-start"]
        assert starts and all("no room for both copies" in e.message for e in starts), said[-40:]
        # one node at a time: the second node's drain starts only after the first node's replacement served
        drains = [e.seq for e in evs if e.kind == "drain"]
        dones = [e.seq for e in evs if e.kind == "cutover-done"]
        assert len(drains) >= 2 and drains[1] > dones[0], said[-40:]
        for llm in LLMS:
            assert gaps(records, llm).length_s < 3.0, (llm, gaps(records, llm))
    finally:
        daemon.request_stop(everything=True)
        await asyncio.wait_for(task, 120)


async def test_a_daemon_killed_during_a_cutover_completes_it_after_restart_without_duplicates_or_orphans(
        tmp_path: Path, state: Path, sv: Any) -> None:
    from scepsy_hpc.backend.local import LocalBackend

    assert sv.scepsy(state, "daemon", "start", "--poll", "0.5").returncode == 0
    up = sv.scepsy(state, "up", str(sv.small_plan(tmp_path / "p.yaml")), "--name", "kc", "--detach", "--time-scale",
                   "0.05", "--time", "0:35", "--cutover-margin", "4", "--drain-grace", "10")
    assert up.returncode == 0, up.stderr
    doc = sv.wait_state(state, "kc", "serving")

    def cutting_over() -> bool:
        return bool(kinds(events(sv, state, "kc"), "cutover-start"))

    load = SteadyLoad(f"{doc['gateway_url']}/d/kc/v1", LLMS, 6.0, max_tokens=8, timeout_s=60.0,
                      api_key=owner_key(state, "kc"))
    await load.start()
    try:
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(cutting_over) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await asyncio.to_thread(cutting_over)
        daemon_pid = json.loads(sv.scepsy(state, "daemon", "status", "--json").stdout)["pid"]
        os.kill(daemon_pid, signal.SIGKILL)
        await asyncio.sleep(2.0)
        assert sv.scepsy(state, "daemon", "start", "--poll", "0.5").returncode == 0

        def finished() -> bool:
            d = sv.status(state, "kc")
            live = [j for j in d["jobs"] if j["ended"] is None]
            return d["state"] == "serving" and len(live) == 2 and not set(doc["job_ids"]) & {j["job_id"] for j in live}

        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(finished) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
    finally:
        records = await load.stop()
    after = sv.status(state, "kc")
    assert finished(), json.dumps(after)[:3000]
    s = summary(records)
    assert s["failed"] == 0, s
    # nothing duplicated: one replacement per node; nothing orphaned: every other job of ours has ended
    backend = LocalBackend(state / ".local-jobs")
    replacements = [j for j in after["jobs"] if j["replaces"]]
    assert sorted(j["unit"] for j in replacements if j["ended"] is None) == ["node1", "node2"]
    running = {p.name for p in (state / ".local-jobs").glob("local-*") if backend.status(p.name).active}
    assert running == {j["job_id"] for j in after["jobs"] if j["ended"] is None}


async def test_a_drained_node_is_excluded_and_its_job_cut_over_to_another_node_failing_no_call(
        tmp_path: Path, state: Path, sv: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from scepsy_hpc.backend.local import LocalBackend
    from scepsy_hpc.service import continuity
    from scepsy_hpc.service.daemon import Daemon
    from scepsy_hpc.service.deploy import UpRequest
    from scepsy_hpc.service.paths import StatePaths

    monkeypatch.setattr(continuity, "NODE_CHECK_S", 1.0)   # the nodes' states read every second, not every 30 s
    paths = StatePaths(state)
    paths.ensure()
    backend = LocalBackend(paths.local_jobs, nodes={"node1": 4, "node2": 4, "node3": 4})
    daemon = Daemon(paths, poll_s=0.5, backends={"local": backend})
    task = asyncio.create_task(daemon.run())
    try:
        while daemon._http is None:
            await asyncio.sleep(0.05)
        await daemon.up(UpRequest(name="dn", target=str(sv.small_plan(tmp_path / "p.yaml")), time_scale=0.05,
                                  drain_grace_s=10.0))
        deadline = time.monotonic() + 60
        while daemon.store.get_deployment("dn").state != "serving" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        (on_n2,) = [j for j in daemon.store.jobs("dn", live_only=True) if j.nodes == "node2"]

        def moved() -> bool:
            live = daemon.store.jobs("dn", live_only=True)
            return daemon.store.get_deployment("dn").state == "serving" and [j.nodes for j in live if j.unit == "node2"] == ["node3"]

        backend.node_states["node2"] = "drained"   # an admin's `scontrol update nodename=node2 state=drain`
        records = await drive_until(f"{daemon.gateway.url}/d/dn/v1", moved, timeout_s=60,
                                  key=owner_key(state, "dn"))
        said = [f"{e.kind}: {e.message}" for e in daemon.store.events("dn")]
        assert moved(), said[-30:]
        assert summary(records)["failed"] == 0, summary(records)
        assert any(k.startswith("node-excluded: node node2 excluded") and "drained" in k for k in said), said[-30:]
        assert any(k.startswith("cutover-start") and "excluded node" in k for k in said), said[-30:]
        assert daemon.store.get_deployment("dn").options["excluded_nodes"].keys() == {"node2"}
        ended = {j.job_id: j for j in daemon.store.jobs("dn")}[on_n2.job_id]
        assert ended.state == "CANCELLED" and ended.drain_started is not None   # drained first, then cancelled
    finally:
        daemon.request_stop(everything=True)
        await asyncio.wait_for(task, 120)


async def test_a_job_requeued_by_slurm_is_abandoned_cancelled_and_its_node_placed_anew(
        tmp_path: Path, state: Path, sv: Any) -> None:
    import dataclasses

    from scepsy_hpc.backend.local import LocalBackend
    from scepsy_hpc.service.daemon import Daemon
    from scepsy_hpc.service.deploy import UpRequest
    from scepsy_hpc.service.paths import StatePaths

    class Requeueing(LocalBackend):
        """The local backend, except that the jobs in `requeued` read as Slurm shows a requeued job."""

        requeued: set[str] = set()
        cancels: list[str] = []

        def status(self, job_id: str) -> Any:
            st = super().status(job_id)
            return dataclasses.replace(st, state="PENDING", reason="BeginTime") if job_id in self.requeued and \
                st.active else st

        def cancel(self, job_id: str, grace_s: float = 10.0) -> None:
            self.cancels.append(job_id)
            super().cancel(job_id, grace_s)

    paths = StatePaths(state)
    paths.ensure()
    backend = Requeueing(paths.local_jobs)
    daemon = Daemon(paths, poll_s=0.5, backends={"local": backend})
    task = asyncio.create_task(daemon.run())
    try:
        while daemon._http is None:
            await asyncio.sleep(0.05)
        await daemon.up(UpRequest(name="rq", target=str(sv.small_plan(tmp_path / "p.yaml")), time_scale=0.05))
        deadline = time.monotonic() + 60
        while daemon.store.get_deployment("rq").state != "serving" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        (victim,) = [j for j in daemon.store.jobs("rq", live_only=True) if j.unit == "node2"]
        backend.requeued.add(victim.job_id)   # Slurm requeued it (preemption, a node failure)

        def replaced() -> bool:
            live = [j for j in daemon.store.jobs("rq", live_only=True) if j.role != "abandoned"]
            return daemon.store.get_deployment("rq").state == "serving" and \
                victim.job_id not in {j.job_id for j in live} and {j.unit for j in live} == {"node1", "node2"}

        records = await drive_until(f"{daemon.gateway.url}/d/rq/v1", replaced, timeout_s=60,
                                  key=owner_key(state, "rq"))
        said = [f"{e.kind}: {e.message}" for e in daemon.store.events("rq")]
        assert replaced(), said[-20:]
        assert any(f"job {victim.job_id} abandoned: requeued by Slurm" in m for m in said), said[-20:]
        assert victim.job_id in backend.cancels and summary(records)["failed"] == 0
        backend.requeued.discard(victim.job_id)   # now Slurm shows what the cancel did
        deadline = time.monotonic() + 20
        while {j.job_id: j for j in daemon.store.jobs("rq")}[victim.job_id].ended is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        gone = {j.job_id: j for j in daemon.store.jobs("rq")}[victim.job_id]
        assert gone.ended is not None and gone.state == "CANCELLED" and gone.role == "abandoned"
    finally:
        daemon.request_stop(everything=True)
        await asyncio.wait_for(task, 120)
