"""Job scripts rendered from the templates in `slurm/`, with every value checked or shell-quoted.

Placeholders are `{{name}}`; rendering fails on a missing or unused value, so a template and its
caller cannot drift apart silently. Values reach a script in two ways: `#SBATCH` directives, which
sbatch reads itself (no shell: only names, numbers and paths without whitespace or quotes are
allowed there), and the script body, where every word is quoted with `shlex.quote`.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Mapping, Sequence

from scepsy_hpc.backend.base import NodeJob, check_name
from scepsy_hpc.errors import SpecError

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_WALLTIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
    """A path for an #SBATCH line: absolute, no whitespace or quotes; '%' doubled (Slurm's filename patterns)."""
    text = str(path)
    if not path.is_absolute() or re.search(r"[\s'\"\\]", text):
        raise SpecError(f"{what} {text!r}: Slurm reads this path from an #SBATCH line, which cannot carry whitespace, "
                        f"quotes or backslashes, and it must be absolute; choose a directory without them (--state-dir)")
    return text.replace("%", "%%")


def check_walltime(value: str) -> str:
    """Slurm walltime syntax: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    if not _WALLTIME.fullmatch(value):
        raise SpecError(f"walltime {value!r}: use Slurm's syntax, e.g. 4:00:00 or 1-00:00:00")
    return value


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


def sbatch_directives(job: NodeJob) -> list[str]:
    """The #SBATCH lines of a NodeJob."""
    check_name(job.name, "job name")
    if not job.nodes:
        raise SpecError(f"job {job.name}: no nodes to run on (the placement is empty)")
    lines = [f"--job-name={job.name}", f"--nodes={len(job.nodes)}", "--ntasks-per-node=1",
             f"--nodelist={','.join(check_node(n) for n in job.nodes)}",
             f"--output={directive_path(job.log_dir, 'log directory')}/job-%j.out"]
    if job.gpus_per_node > 0:
        kind = f"{check_name(job.gres_type, 'GRES type')}:" if job.gres_type else ""
        lines.append(f"--gres=gpu:{kind}{int(job.gpus_per_node)}")
    for flag, value in (("partition", job.partition), ("account", job.account), ("qos", job.qos)):
        if value:
            lines.append(f"--{flag}={check_name(value, flag)}")
    if job.time:
        lines.append(f"--time={check_walltime(job.time)}")
    if job.constraint:
        if not re.fullmatch(r"[A-Za-z0-9_.&|\[\]()*-]+", job.constraint):
            raise SpecError(f"constraint {job.constraint!r}: features joined by & | [] () only")
        lines.append(f"--constraint={job.constraint}")
    if job.switches:
        wait = f"@{check_walltime(job.switches_wait)}" if job.switches_wait else ""
        lines.append(f"--switches={int(job.switches)}{wait}")
    if job.cpus_per_node:
        lines.append(f"--cpus-per-task={int(job.cpus_per_node)}")
    return [f"#SBATCH {ln}" for ln in lines]


def render_sbatch(job: NodeJob) -> str:
    """The serving job's sbatch script."""
    return render("serve.sbatch.tmpl", {
        "directives": "\n".join(sbatch_directives(job)),
        "exports": exports(job.env),
        "workdir": quote(job.workdir),
        "n_nodes": str(len(job.nodes)),
        "step_output": quote(f"{directive_path(job.log_dir, 'log directory')}/agent-%N.out"),
        "command": quote_argv(job.command),
    })


def render_local(job: NodeJob) -> str:
    """The local backend's script: the command once per node name."""
    return render("local.sh.tmpl", {
        "exports": exports(job.env),
        "log_dir": quote(job.log_dir),
        "workdir": quote(job.workdir),
        "nodes": " ".join(quote(check_node(n)) for n in job.nodes),
        "command": quote_argv(job.command),
    })
