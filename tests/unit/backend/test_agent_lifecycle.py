"""The node agent as a process: its engines die with it, its report beats, leftovers are reaped only if they
are ours, and the submitit entry point finds its node. Real processes (sim engines), Linux only."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scepsy_hpc.backend import agent as agent_mod
from scepsy_hpc.backend.agent import (ENGINE_ID_ENV, HEARTBEAT_ENV, STALE_AFTER_S, Agent, engine_id, job_main,
                                      reap_engines, report_stale, shell_line)
from scepsy_hpc.backend.records import RERUN, AgentReport, InstanceReport, ServeConfig, ServeInstance
from scepsy_hpc.engine.adapters import EngineLaunch
from scepsy_hpc.engine.supervisor import group_alive, pid_alive, port_free, start, stop_groups
from scepsy_hpc.spec.records import read_record, write_record

PY = sys.executable
ROOT = str(Path(__file__).resolve().parents[3])

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")


def _launch(llm: str) -> EngineLaunch:
    return EngineLaunch("sim", "llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", llm, "h100-sxm",
                        host="127.0.0.1", port=0)


def _session(tmp_path: Path, llms: list[str], prefix: str = "") -> Path:
    """A session directory whose serve.json puts one sim engine per LLM on node n1, each on its own GPU."""
    config = ServeConfig(engine="sim", launch_prefix=prefix, health_timeout_s=30.0, instances=[
        ServeInstance(llm=llm, replica=0, node="n1", gpus=[i], gpu_frac=1.0, mps_pct=100, port=0, launch=_launch(llm))
        for i, llm in enumerate(llms)])
    write_record(tmp_path / "serve.json", config)
    return tmp_path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "SUBMITIT", "CUDA_VISIBLE"))}
    return {**env, "PYTHONPATH": ROOT, "SCEPSY_BIND_HOST": "127.0.0.1", **extra}


def _report(session: Path) -> AgentReport | None:
    try:
        return read_record(session / "agents" / "n1.json", AgentReport, RERUN)
    except (FileNotFoundError, ValueError):
        return None


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _agent(session: Path, code: str | None = None, **env: str) -> subprocess.Popen[bytes]:
    argv = [PY, "-m", "scepsy_hpc.backend.agent", "--session", str(session), "--node", "n1"] if code is None \
        else [PY, "-c", code, str(session)]
    with open(session / "agent.out", "wb") as out:
        return subprocess.Popen(argv, env=_env(**env), start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("prefix", ["", "cd . &&"])
def test_engines_die_with_their_agent_killed_by_kill_9(tmp_path: Path, prefix: str) -> None:
    session = _session(tmp_path, ["a", "b"], prefix)
    agent = _agent(session)
    try:
        assert _wait(lambda: (r := _report(session)) is not None and r.state in ("ready", "failed"), 20.0), \
            (session / "agent.out").read_text()
        report = _report(session)
        assert report is not None and report.state == "ready", report
        pids = [i.pid for i in report.instances]
        assert all(pids) and all(not port_free(i.port) for i in report.instances)
        for pid in pids:   # the reported pid is the engine itself (the shell exec'd it), leading its own group
            assert b"scepsy_hpc.engine.sim_server" in Path(f"/proc/{pid}/cmdline").read_bytes()
            assert os.getpgid(pid) == pid
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        t0 = time.monotonic()
        assert _wait(lambda: not any(group_alive(p) for p in pids), 3.0), "an engine outlived its agent"
        assert time.monotonic() - t0 < 2.5
        assert _wait(lambda: all(port_free(i.port) for i in report.instances), 2.0)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        stop_groups([i.pid for i in (_report(session) or report).instances if i.pid], grace_s=1.0)


def test_the_report_beats_without_change(tmp_path: Path) -> None:
    session = _session(tmp_path, [])   # no engine on n1: the agent is ready at once and only watches
    agent = _agent(session, **{HEARTBEAT_ENV: "0.3"})
    try:
        assert _wait(lambda: (r := _report(session)) is not None and r.state == "ready", 10.0)
        first = _report(session)
        assert first is not None
        assert _wait(lambda: (r := _report(session)) is not None and r.updated > first.updated, 2.0)
        later = _report(session)
        assert later is not None and agent.poll() is None and later.state == "ready"
        assert later.model_dump(exclude={"updated"}) == first.model_dump(exclude={"updated"})
        assert not report_stale(later) and report_stale(later, now=later.updated + STALE_AFTER_S + 1)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    final = _report(session)
    assert final is not None and final.state == "stopped" and not report_stale(final, now=final.updated + 3600)


def test_job_main_replaces_submitits_handlers(tmp_path: Path) -> None:
    # as submitit's process_job leaves them: SIGTERM only logged, its preemption signal requeueing
    pytest.importorskip("submitit")
    session = _session(tmp_path, [])
    code = ("import signal, sys; from scepsy_hpc.backend.agent import job_main; "
            "signal.signal(signal.SIGTERM, lambda *a: print('bypassed', flush=True)); "
            "signal.signal(signal.SIGUSR2, lambda *a: sys.exit('requeued')); sys.exit(job_main(sys.argv[1]))")
    agent = _agent(session, code, SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1",
                   SLURM_NODEID="0")
    try:
        assert _wait(lambda: (r := _report(session)) is not None and r.state == "ready", 10.0)
        for sig in (signal.SIGUSR2, signal.SIGUSR1):   # the preemption signal drains as the walltime warning does
            agent.send_signal(sig)
            time.sleep(0.2)
            assert agent.poll() is None
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    out = (session / "agent.out").read_text()
    assert "got SIGUSR2; draining" in out and "bypassed" not in out and "requeued" not in out
    report = _report(session)
    assert report is not None and report.state == "stopped" and report.draining_since is not None


def _agent_in_process(session: Path) -> Agent:
    config = read_record(session / "serve.json", ServeConfig, RERUN)
    agent = Agent(session, "n1", config, _env())
    for inst in agent.instances:
        inst.cuda_visible_devices = ",".join(map(str, inst.gpus))
    return agent


def test_reap_engines_stops_the_engines_of_a_report_even_a_member_that_outlived_its_leader(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", ROOT)
    session = _session(tmp_path, ["a", "b"])
    agent = _agent_in_process(session)
    for inst in agent.instances:   # spawned as the agent spawns them; this test process is their parent
        agent.start(inst)
    agent.write()
    report = _report(session)
    assert report is not None and all(i.pid for i in report.instances)
    # one more engine-like group whose leader died and left a child: found by the child's environment
    started_at = time.time()
    orphan_inst = InstanceReport(llm="c", replica=0, gpus=[2], gpu_frac=1.0, mps_pct=100, started_at=started_at)
    leader = start(["bash", "-c", "sleep 60 & echo $!; exec sleep 60"], tmp_path / "c.log", what="c",
                   env={**os.environ, ENGINE_ID_ENV: engine_id(report.pid, "n1", orphan_inst)})
    assert _wait(lambda: leader.log_path.read_text().strip() != "", 5.0)
    os.kill(leader.pid, signal.SIGKILL)
    leader.popen.wait()
    orphaned = report.model_copy(update={"instances": [*report.instances,
                                                       orphan_inst.model_copy(update={"pid": leader.pid})]})
    pgids = [i.pid for i in orphaned.instances]
    try:
        assert all(group_alive(p) for p in pgids)
        assert sorted(reap_engines([orphaned], grace_s=2.0)) == sorted(pgids)
        assert not any(group_alive(p) for p in pgids)
        assert reap_engines([orphaned]) == []   # nothing left: nothing to stop
    finally:
        stop_groups(pgids, grace_s=1.0)


def test_reap_engines_refuses_a_recycled_pid(tmp_path: Path) -> None:
    # an unrelated process leading its own group, under a pid the report names: no marker, not ours
    stranger = start(["sleep", "60"], tmp_path / "s.log", what="stranger")
    # and one that carries a marker of the same engine but from another start
    inst = InstanceReport(llm="a", replica=0, gpus=[0], gpu_frac=1.0, mps_pct=100, started_at=1000.0)
    other_start = start(["sleep", "60"], tmp_path / "o.log", what="other",
                        env={**os.environ, ENGINE_ID_ENV: engine_id(os.getpid(), "n1", inst)})
    report = AgentReport(node="n1", host="h", pid=os.getpid(), state="ready", updated=time.time(), instances=[
        inst.model_copy(update={"pid": stranger.pid, "started_at": 1000.0}),
        inst.model_copy(update={"pid": other_start.pid, "started_at": 2000.0})])
    try:
        assert reap_engines([report], grace_s=1.0) == []
        assert pid_alive(stranger.pid) and pid_alive(other_start.pid)
    finally:
        stop_groups([stranger.pid, other_start.pid], grace_s=1.0)


def test_job_main_takes_its_node_from_submitits_job_environment(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("submitit")
    seen: list[tuple[Path, str, list[int]]] = []
    monkeypatch.setattr(agent_mod, "_run_agent", lambda session, node, warnings: seen.append((session, node, warnings)))
    for k in [k for k in os.environ if k.startswith(("SLURM", "SUBMITIT"))]:
        monkeypatch.delenv(k)
    # what submitit's SlurmJobEnvironment reads inside a two-node job, on the second node
    for k, v in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[1-2]",
                 "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
                 "SLURMD_NODENAME": "not-this"}.items():
        monkeypatch.setenv(k, v)
    assert job_main(str(tmp_path)) == 0
    assert seen[-1][:2] == (tmp_path, "node2") and signal.SIGUSR2 in seen[-1][2]
    # outside a submitit job: $SLURMD_NODENAME, as `python -m scepsy_hpc.backend.agent` does
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    assert job_main(str(tmp_path)) == 0
    assert seen[-1][1] == "not-this"


def test_shell_line_execs_the_engine_where_the_prefix_allows() -> None:
    launch = dataclasses.replace(_launch("a"), port=8100)
    line = shell_line(launch, "")
    which = {"apptainer": "/usr/bin/apptainer"}.get
    assert shell_line(launch, "module load vllm &&", which) == f"module load vllm && exec {line}"
    assert shell_line(launch, "source env.sh;", which) == f"source env.sh; exec {line}"
    assert shell_line(launch, "apptainer exec --nv img.sif", which) == f"exec apptainer exec --nv img.sif {line}"
    # left to bash: a list ending in a wrapper, an assignment, something that is not a program
    for prefix in ("module load x && apptainer exec img", "HF_HOME=/x apptainer exec img", "module load x"):
        assert shell_line(launch, prefix, which) == f"{prefix} {line}"
