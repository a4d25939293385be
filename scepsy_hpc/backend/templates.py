"""Job scripts, with every value checked or shell-quoted: the Slurm job's submission script (submitit's),
and the local backend's script rendered from the templates in `slurm/`.

The Slurm serving job is submitted with submitit (`SlurmExecutor`); `submission_parameters` turns a
`NodeJob` into the executor's parameters and `submission_script` renders the sbatch script submitit
writes for them, without submitting (the golden test compares it; FakeSlurm submits it). Values reach a
script in two ways: `#SBATCH` directives, which sbatch reads itself without a shell (only names,
numbers and absolute paths without quotes, backslashes, control characters or '%' go there; submitit
quotes a value with spaces, which sbatch understands), and the script body, where every word is quoted
with `shlex.quote`.

Local templates use `{{name}}` placeholders; rendering fails on a missing or unused value, so a template
and its caller cannot drift apart silently.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from scepsy_hpc.backend.base import NodeJob, check_name
from scepsy_hpc.errors import SpecError

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_DIRECTIVE_UNSAFE = re.compile(r"['\"\\%\x00-\x1f\x7f]")
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.&|\[\]()*-]+")

_WALLTIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# 120 s before the time limit Slurm sends USR1 to every task of the job's steps: the node agents, which log
# it as the walltime warning and keep serving (the cut-over to a new job hangs on it). Not to the batch
# shell (`B:`): bash has no trap for USR1, so it would end there and take the job down 2 minutes early.
# submitit's default, USR2@90 to every task, would make submitit's task runner end or requeue the task.
SIGNAL = "USR1@120"
COMMENT_PREFIX = "scepsy:"   # the job's comment (squeue %k) is "scepsy:NAME": a person sees what the job is


def template_dir() -> Path:
    """Where the job templates live: $SCEPSY_SLURM_DIR, else `slurm/` beside the package."""
    env = os.environ.get("SCEPSY_SLURM_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "slurm"


def render(template: str, values: Mapping[str, str]) -> str:
    """The template with every {{name}} replaced; SpecError if a value is missing or left over."""
    path = template_dir() / template
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the job template ({exc.strerror}); set SCEPSY_SLURM_DIR to the "
                        f"repository's slurm/ directory") from None
    wanted = set(_PLACEHOLDER.findall(text))
    missing, unused = sorted(wanted - set(values)), sorted(set(values) - wanted)
    if missing or unused:
        raise SpecError(f"{path}: template and caller disagree: missing {missing or 'nothing'}, unused {unused or 'nothing'}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def quote(value: str | Path) -> str:
    """One shell word."""
    text = str(value)
    if "\0" in text:
        raise SpecError(f"{text!r}: a NUL byte cannot be passed to a job")
    return shlex.quote(text)


def quote_argv(argv: Sequence[str]) -> str:
    """A command line, each word quoted."""
    return " ".join(quote(a) for a in argv)


def directive_path(path: Path, what: str) -> str:
    """A path for an #SBATCH line: absolute, without quotes, backslashes, control characters or '%'.

    sbatch reads these lines without a shell (it keeps a quoted value with spaces together, which is how
    submitit writes one) and expands '%' patterns in them; submitit puts its own %j there."""
    text = str(path)
    if not path.is_absolute() or _DIRECTIVE_UNSAFE.search(text):
        raise SpecError(f"{what} {text!r}: Slurm reads this path from an #SBATCH line, which cannot carry quotes, "
                        f"backslashes, control characters or '%', and it must be absolute; choose a directory without "
                        f"them (--state-dir)")
    return text


def check_walltime(value: str) -> str:
    """Slurm walltime syntax: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    if not _WALLTIME.fullmatch(value):
        raise SpecError(f"walltime {value!r}: use Slurm's syntax, e.g. 4:00:00 or 1-00:00:00")
    return value


def walltime_seconds(text: str) -> int:
    """Slurm walltime (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) in seconds."""
    days, _, rest = check_walltime(text).rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + m * 60 + s
    return {1: lambda p: p[0] * 60, 2: lambda p: p[0] * 60 + p[1],
            3: lambda p: p[0] * 3600 + p[1] * 60 + p[2]}[len(parts)](parts)


def check_node(value: str) -> str:
    """A node name as Slurm prints it."""
    if not _NODE.fullmatch(value):
        raise SpecError(f"node name {value!r}: expected letters, digits, '.', '_' or '-'")
    return value


def exports(env: Mapping[str, str]) -> str:
    """`export K=V` lines, keys checked and values quoted."""
    lines = []
    for k, v in env.items():
        if not _ENV_KEY.fullmatch(k):
            raise SpecError(f"environment variable name {k!r}: letters, digits and '_' only")
        lines.append(f"export {k}={quote(v)}")
    return "\n".join(lines)


def submitit_folder(log_dir: Path) -> Path:
    """submitit's folder for a job logging to `log_dir`: one subfolder per job id (%j), beside the logs."""
    return log_dir / "submitit" / "%j"


def submission_parameters(job: NodeJob) -> dict[str, Any]:
    """`submitit.SlurmExecutor.update_parameters(**these)` for `job`, every value checked."""
    from scepsy_hpc.backend.profiling import walltime_minutes

    check_name(job.name, "job name")
    if not job.nodes:
        raise SpecError(f"job {job.name}: no nodes to run on (the placement is empty)")
    directive_path(job.log_dir, "log directory")
    # umask: what the job writes is its owner's only (sbatch passes on the submitter's umask, which may be wider)
    setup = ["umask 077", "export PYTHONUNBUFFERED=1", *filter(None, exports(job.env).splitlines()),
             f"cd {quote(job.workdir)}"]
    # no-requeue: the daemon replaces a job that fails; one Slurm requeued would come back later as an orphan
    extra: dict[str, Any] = {"signal": SIGNAL, "no_requeue": True}
    params: dict[str, Any] = dict(
        job_name=job.name, nodes=len(job.nodes), ntasks_per_node=1,
        nodelist=",".join(check_node(n) for n in job.nodes),
        # explicit even when None: submitit's own default is 5 minutes; None leaves it to the partition's default
        time=walltime_minutes(check_walltime(job.time)) if job.time else None,
        comment=f"{COMMENT_PREFIX}{job.name}", wckey=None, setup=setup,
        # an agent that fails takes the job down, so the one watching it sees at once
        srun_args=["--kill-on-bad-exit=1"], additional_parameters=extra)
    if job.gpus_per_node > 0:
        kind = f"{check_name(job.gres_type, 'GRES type')}:" if job.gres_type else ""
        params["gres"] = f"gpu:{kind}{int(job.gpus_per_node)}"
    for flag, value in (("partition", job.partition), ("account", job.account), ("qos", job.qos)):
        if value:
            params[flag] = check_name(value, flag)
    if job.constraint:
        if not _CONSTRAINT.fullmatch(job.constraint):
            raise SpecError(f"constraint {job.constraint!r}: features joined by & | [] () only")
        params["constraint"] = job.constraint
    if job.switches:
        wait = f"@{check_walltime(job.switches_wait)}" if job.switches_wait else ""
        extra["switches"] = f"{int(job.switches)}{wait}"
    if job.cpus_per_node:
        params["cpus_per_task"] = int(job.cpus_per_node)
    return params


def sbatch_text(folder: Path, parameters: Mapping[str, Any], python: str = sys.executable) -> str:
    """The sbatch script submitit writes for `parameters` in `folder`, running its task with `python`."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(folder).absolute()
    # what SlurmExecutor._submitit_command_str builds: the task runner loads the job's pickle from `folder`
    command = " ".join([quote(python), "-u -m submitit.core._submit", quote(folder)])
    return str(_make_sbatch_string(command=command, folder=folder, **parameters))


def submission_script(job: NodeJob, python: str = sys.executable) -> str:
    """The sbatch script submitit writes for `job` (nothing is submitted)."""
    return sbatch_text(submitit_folder(job.log_dir), submission_parameters(job), python)


def render_local(job: NodeJob) -> str:
    """The local backend's script: the command once per node name."""
    return render("local.sh.tmpl", {
        "exports": exports(job.env),
        "log_dir": quote(job.log_dir),
        "workdir": quote(job.workdir),
        "nodes": " ".join(quote(check_node(n)) for n in job.nodes),
        "command": quote_argv(job.command),
    })
