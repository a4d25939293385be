"""Job scripts: the serving job's submission script (submitit's) against a golden copy, hostile values refused in #SBATCH
lines, and the local backend's script run for real with hostile paths and arguments (quoting proven by what arrives, not
by reading)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from submitit.slurm.slurm import _get_default_parameters

from scepsy_hpc.backend.base import JobStatus, NodeJob
from scepsy_hpc.backend.local import LocalBackend
from scepsy_hpc.backend.templates import render_local, submission_parameters, submission_script
from scepsy_hpc.errors import SlurmError, SpecError

GOLDEN = Path(__file__).parent / "golden"
SESSION = "/scratch/u/sessions/demo"   # fixed paths and python, so that the golden does not depend on the machine
PY = "/opt/venv/bin/python"
COMMAND = (PY, "-m", "scepsy_hpc.backend.agent", "--session", SESSION)
HOSTILE = "we$(touch pwned)'s `touch pwned` dir"


def _job(**kw: Any) -> NodeJob:
    base: dict[str, Any] = dict(name="scepsy-demo", command=COMMAND, nodes=("node1", "node2"), gpus_per_node=4,
                                log_dir=Path(SESSION) / "logs", workdir=Path("/scratch/u/my project"))
    return NodeJob(**{**base, **kw})


def _script(**kw: Any) -> str:
    return submission_script(_job(**kw), python=PY)


def _directives(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]


FULL = _job(partition="gpu", account="proj-42", qos="high", time="4:00:00", switches=1, switches_wait="0:30:00",
            constraint="h100&ib", gres_type="h100", cpus_per_node=32, session=Path(SESSION),
            env={"HF_HOME": "/scratch/u/hf cache", "SCEPSY_NOTE": "it's $(not) run"})


# -- the submission script ------------------------------------------------------------------------------


def test_submission_script_with_every_option_matches_the_golden() -> None:
    text = submission_script(FULL, python=PY)
    path = GOLDEN / "serve.submission.sh"
    if os.environ.get("SCEPSY_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing; run with SCEPSY_UPDATE_GOLDEN=1 and check it by hand"
    assert text == path.read_text()


def test_goldens_have_no_strays() -> None:
    assert sorted(p.name for p in GOLDEN.iterdir()) == ["serve.submission.sh"]


def test_submission_script_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n"], input=submission_script(FULL, python=PY), capture_output=True, text=True,
                          timeout=10)
    assert (done.returncode, done.stderr) == (0, "")


def test_every_parameter_is_one_submitit_accepts() -> None:
    assert set(submission_parameters(FULL)) <= set(_get_default_parameters())


def test_a_minimal_job_has_no_optional_directives_and_no_submitit_defaults() -> None:
    logs = f"{SESSION}/logs/submitit/%j"
    assert _directives(_script(gpus_per_node=0)) == [
        "#SBATCH --comment=scepsy:scepsy-demo", f"#SBATCH --error={logs}/%j_0_log.err", "#SBATCH --job-name=scepsy-demo",
        "#SBATCH --no-requeue", "#SBATCH --nodelist=node1,node2", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --open-mode=append", f"#SBATCH --output={logs}/%j_0_log.out",
        "#SBATCH --signal=USR1@120"]   # no --time=5, no --wckey=submitit; --no-requeue: the daemon replaces lost jobs


def test_the_task_runs_on_every_node_killing_the_job_when_one_fails_in_the_workdir_with_the_env() -> None:
    text = submission_script(FULL, python=PY)
    srun = next(ln for ln in text.splitlines() if ln.startswith("srun "))
    assert " --kill-on-bad-exit=1 " in srun
    assert srun.endswith(f"{PY} -u -m submitit.core._submit {SESSION}/logs/submitit/%j")
    setup = text.split("# setup\n")[1].split("\n\n")[0].splitlines()
    assert setup == ["umask 077", "export PYTHONUNBUFFERED=1", "export HF_HOME='/scratch/u/hf cache'",
                     "export SCEPSY_NOTE='it'\"'\"'s $(not) run'", "cd '/scratch/u/my project'"]


BAD_NAMES = ["gpu; rm -rf /", "a b", "$(id)", "x" * 65, "-p", "name\nq"]


@pytest.mark.parametrize("field", ["name", "partition", "account", "qos", "gres_type"])
@pytest.mark.parametrize("value", BAD_NAMES)
def test_a_hostile_name_is_refused_naming_it(field: str, value: str) -> None:
    with pytest.raises(SpecError) as err:
        _script(**{field: value})
    assert repr(value) in str(err.value)


def test_an_empty_job_name_is_refused_and_64_characters_are_fine() -> None:
    with pytest.raises(SpecError) as err:
        _script(name="")
    assert "job name ''" in str(err.value)
    assert "#SBATCH --job-name=" + "x" * 64 in _script(name="x" * 64)


@pytest.mark.parametrize("field", ["partition", "account", "qos"])
def test_an_empty_partition_account_or_qos_means_not_given(field: str) -> None:
    assert f"--{field}" not in _script(**{field: ""})


@pytest.mark.parametrize("value", ["4h", "4:00:00; id", "1-", "four", "4:0"])
def test_a_walltime_outside_slurm_syntax_is_refused(value: str) -> None:
    with pytest.raises(SpecError) as err:
        _script(time=value)
    assert f"walltime {value!r}" in str(err.value)


@pytest.mark.parametrize("value, minutes", [("30", 30), ("1:30", 2), ("4:00:00", 240), ("1-00:00:00", 1440),
                                            ("2-12", 3600)])
def test_slurm_walltimes_become_whole_minutes_rounded_up(value: str, minutes: int) -> None:
    assert f"#SBATCH --time={minutes}" in _directives(_script(time=value))


def test_a_switch_wait_outside_slurm_syntax_is_refused() -> None:
    with pytest.raises(SpecError) as err:
        _script(switches=2, switches_wait="soon")
    assert "'soon'" in str(err.value)


@pytest.mark.parametrize("log_dir", ["/scratch/u/it's", '/scratch/u/"q"', "/scratch/u/a\\b", "relative/logs",
                                     "/scratch/u/100%/logs", "/scratch/u/a\nb"])
def test_a_log_dir_sbatch_cannot_read_from_a_directive_is_refused(log_dir: str) -> None:
    with pytest.raises(SpecError) as err:
        _script(log_dir=Path(log_dir))
    assert repr(log_dir) in str(err.value)
    assert "#SBATCH" in str(err.value)


def test_a_log_dir_with_spaces_is_quoted_as_one_value_which_sbatch_reads_so() -> None:
    assert "#SBATCH --output='/scratch/u/my logs/submitit/%j/%j_0_log.out'" in _script(log_dir=Path("/scratch/u/my logs"))


@pytest.mark.parametrize("key", ["A B", "1A", "A-B", "A;B", ""])
def test_a_bad_environment_variable_name_is_refused(key: str) -> None:
    with pytest.raises(SpecError) as err:
        _script(env={key: "v"})
    assert repr(key) in str(err.value)


@pytest.mark.parametrize("field, value", [("nodes", ("node1", "node2;id")), ("nodes", ("",)), ("constraint", "h100 && $(id)")])
def test_hostile_nodes_and_constraints_are_refused(field: str, value: Any) -> None:
    with pytest.raises(SpecError) as err:
        _script(**{field: value})
    assert repr(value[-1] if field == "nodes" else value) in str(err.value)


def test_a_job_without_nodes_is_refused() -> None:
    with pytest.raises(SpecError) as err:
        _script(nodes=())
    assert "no nodes" in str(err.value)


@pytest.mark.parametrize("field, value", [("nodes", ("node1\n", "node2")), ("partition", "gpu\n"), ("time", "4:00:00\n"),
                                          ("env", {"A\n": "v"})])
def test_a_trailing_newline_is_refused(field: str, value: Any) -> None:
    with pytest.raises(SpecError):
        _script(**{field: value})


def test_render_refuses_a_template_that_disagrees_with_its_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "local.sh.tmpl").write_text("#!/bin/bash\n{{exports}}\n{{log_dir}}\n{{partition_note}}\n")
    monkeypatch.setenv("SCEPSY_SLURM_DIR", str(tmp_path))
    with pytest.raises(SpecError) as err:
        render_local(_job())
    msg = str(err.value)
    assert "missing ['partition_note']" in msg
    assert "unused ['command', 'nodes', 'workdir']" in msg


def test_render_says_where_to_find_a_missing_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCEPSY_SLURM_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(SpecError) as err:
        render_local(_job())
    assert "local.sh.tmpl" in str(err.value) and "SCEPSY_SLURM_DIR" in str(err.value)


# -- the local backend: its script run for real ---------------------------------------------------------


def _wait_done(backend: LocalBackend, job_id: str, timeout_s: float = 20.0) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    status = backend.status(job_id)
    while status.active and time.monotonic() < deadline:
        time.sleep(0.05)
        status = backend.status(job_id)
    return status


def _local_job(base: Path, command: tuple[str, ...], nodes: tuple[str, ...] = ("n1",), **kw: Any) -> NodeJob:
    return NodeJob(name="demo", command=command, nodes=nodes, gpus_per_node=0, log_dir=base / "logs", workdir=base, **kw)


def test_local_job_passes_hostile_paths_and_arguments_through_unchanged(tmp_path: Path) -> None:
    base = tmp_path / HOSTILE
    outdir = base / "out"
    outdir.mkdir(parents=True)
    # "x; touch pwned" rather than anything destructive: a quoting bug would show as a file, not a loss
    args = ("x; touch pwned", "$(touch pwned)", "`touch pwned`", "it's", "")
    write = ("import sys, os, pathlib; "
             "pathlib.Path(sys.argv[1]).joinpath(os.environ['SLURMD_NODENAME']).write_text(repr(sys.argv[2:]))")
    job = _local_job(base, (sys.executable, "-c", write, str(outdir), *args), nodes=("n1", "n2"),
                     env={"SCEPSY_NOTE": "$(touch pwned)"})
    backend = LocalBackend(tmp_path / "jobs")
    status = _wait_done(backend, backend.submit(job))
    assert (status.state, status.exit_code, status.nodes) == ("COMPLETED", "0:0", "n1,n2")
    assert {p.name: p.read_text() for p in outdir.iterdir()} == {"n1": repr(list(args)), "n2": repr(list(args))}
    assert (base / "logs" / "demo.sh").is_file()
    assert list(tmp_path.rglob("pwned*")) == []
    assert not (Path.cwd() / "pwned").exists()


def test_local_job_that_fails_reports_failed_with_its_exit_code(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "jobs")
    status = _wait_done(backend, backend.submit(_local_job(tmp_path, (sys.executable, "-c", "raise SystemExit(3)"))))
    assert (status.state, status.exit_code, status.active) == ("FAILED", "3:0", False)


def test_cancel_stops_a_local_job_and_its_whole_process_group(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    sleeper = "import os, sys, time, pathlib; pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); time.sleep(60)"
    backend = LocalBackend(tmp_path / "jobs")
    job_id = backend.submit(_local_job(tmp_path, (sys.executable, "-c", sleeper, str(ready))))
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    backend.cancel(job_id, grace_s=5)
    took_s = time.monotonic() - started
    status = backend.status(job_id)
    pgid = int(job_id.split("-", 1)[1])
    live = []   # processes of the job's group that are not zombies (those wait for PID 1 to reap them)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(stat.parent.name)
    assert live == []
    assert ready.exists(), "the command never started, so the cancel proved nothing"
    assert (status.state, status.reason) == ("CANCELLED", "cancelled by scepsy")
    assert took_s < 4


def test_local_status_of_an_unknown_job_is_an_error(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "jobs")
    with pytest.raises(SlurmError) as err:
        backend.status("local-999999999")
    assert "'local-999999999'" in str(err.value) and str(tmp_path / "jobs") in str(err.value)


def test_local_cancel_of_a_finished_job_changes_nothing(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "jobs")
    job_id = backend.submit(_local_job(tmp_path, (sys.executable, "-c", "pass")))
    assert _wait_done(backend, job_id).state == "COMPLETED"
    backend.cancel(job_id)
    assert backend.status(job_id).state == "COMPLETED"
