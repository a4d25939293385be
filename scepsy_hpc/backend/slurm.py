"""The Slurm backend: submitit submits the serving job; squeue and sacct tell its state; scancel.

Every Slurm command but the submission goes through an injected runner (argv → stdout, raising
SlurmError), and the submission through an injected `Submitter` (submitit's `SlurmExecutor` by
default), so the unit tests drive `FakeSlurm` and the integration tests a real cluster through the same
code. Each command run is counted in `calls`.

One job's state (`status`) comes from `sacct` — it knows finished jobs and who cancelled them — and from
`squeue` when sacct does not know the job yet (slurmdbd lags submission by a moment) or accounting is
off; a job that neither knows is retried, then reported as an error naming both answers: never a silent
UNKNOWN. Many jobs at once (`poll`) cost one `squeue --me`, plus one `sacct -u USER -S …` for the jobs
that left the queue, whatever their number.

The submitted task (`_agent_entry`, pickled by reference, so the package must be importable on the
nodes: NodeJob.env's PYTHONPATH) runs the session's node agent in submitit's task on every node; a job
without a session runs its command there instead (`_command_entry`).
"""

from __future__ import annotations

import datetime as dt
import getpass
import importlib
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from scepsy_hpc.backend.base import (ClusterBackend, JobRef, JobStatus, NodeJob, PartitionInfo, normalise_state,
                                     owned)
from scepsy_hpc.backend.templates import submission_parameters, submitit_folder
from scepsy_hpc.errors import InfeasibleError, SlurmError, SpecError
from scepsy_hpc.spec.placement_entry import PlacementEntry
from scepsy_hpc.topology.discover import Runner, discover, run_command
from scepsy_hpc.topology.model import SlurmNode

if TYPE_CHECKING:
    import submitit

__all__ = ["PartitionInfo", "SlurmBackend", "Submitter", "submit_with_submitit"]

SACCT_FIELDS = "JobID,State,ExitCode,NodeList,Reason"
SQUEUE_FORMAT = "%i|%T|%N|%r"
# poll: every job of this user at once; the name and submit time tell a recycled job id from ours
POLL_SQUEUE_FORMAT = "%i|%j|%T|%V|%N|%r|%e"
POLL_SACCT_FIELDS = "JobID,JobName,State,Submit,NodeList,Reason,ExitCode,End"
POLL_LOOKBACK = dt.timedelta(days=7)   # how far back sacct looks for a job whose submit time is not known
_ARRAY_RANGE = re.compile(r"^(\d+)_\[([^\]]+)\]$")
_PLACEHOLDERS = frozenset({"None", "None assigned", "Unknown", "N/A", "(null)"})


class Submitter(Protocol):
    """Submits `fn(*args)` as one Slurm job with SlurmExecutor `parameters`, logging under `folder`; its job id."""

    def __call__(self, folder: Path, parameters: Mapping[str, Any], fn: Callable[..., Any], *args: Any) -> str: ...


def submit_with_submitit(folder: Path, parameters: Mapping[str, Any], fn: Callable[..., Any], *args: Any) -> str:
    """The default Submitter: a submitit SlurmExecutor (it pickles `fn(*args)`, writes the script, runs sbatch)."""
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**parameters)
        return str(executor.submit(fn, *args).job_id)
    except Exception as exc:   # sbatch's refusal (FailedJobError carries its stderr), no srun here, an unwritable folder
        raise SlurmError(f"sbatch refused job {parameters.get('job_name')}: {exc}".rstrip()) from exc


def _agent_entry(session: str) -> int:
    """What submitit runs on every node of a job with a session: the node agent (non-zero ends the task failed)."""
    # looked up when the job runs, not imported here: the agent imports the engine stack this module needs not
    job_main = importlib.import_module("scepsy_hpc.backend.agent").job_main
    rc = int(job_main(session))
    if rc:
        # a returned code would be pickled as a success; an exit fails the srun task, so --kill-on-bad-exit acts
        raise SystemExit(rc)
    return rc


def _command_entry(argv: Sequence[str]) -> int:
    """What submitit runs on every node of a job without a session: `argv`, in place of the task runner."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # exec, not a child: the command gets Slurm's signals (submitit's runner ignores SIGTERM) and its exit code
        # is the task's
        os.execvp(argv[0], list(argv))
    except OSError as exc:
        raise SlurmError(f"cannot run {argv[0]!r} on {os.uname().nodename}: {exc.strerror}") from None


def _clean(text: str) -> str:
    """'' for Slurm's placeholders (None, None assigned, Unknown, N/A)."""
    text = text.strip()
    return "" if text in _PLACEHOLDERS else text


def _expand_array(job_id: str) -> list[str]:
    """'12_[2-4,7%2]' → 12_2 12_3 12_4 12_7 (how sacct/squeue print pending array tasks)."""
    m = _ARRAY_RANGE.match(job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


class SlurmBackend(ClusterBackend):
    """Jobs on a Slurm cluster."""

    name = "slurm"

    def __init__(self, run: Runner = run_command, *, submitter: Submitter = submit_with_submitit,
                 user: str | None = None, retries: int = 5, retry_wait_s: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep, now: Callable[[], dt.datetime] = dt.datetime.now) -> None:
        super().__init__()
        self.run = run
        self.submitter = submitter
        self.user = user          # None: getpass.getuser(), when first needed
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self.sleep = sleep
        self.now = now

    def _run(self, argv: Sequence[str]) -> str:
        """Run one Slurm command through the runner, counted."""
        self.count_call(argv[0])
        return self.run(argv)

    def submit(self, job: NodeJob) -> str:
        """Submit `job` through the submitter; link its submission script beside the logs; its job id.

        With `job.session` every node runs the session's node agent (`_agent_entry`), else `job.command`."""
        folder = submitit_folder(job.log_dir)
        parameters = submission_parameters(job)
        fn, args = ((_agent_entry, (str(job.session),)) if job.session is not None
                    else (_command_entry, (tuple(job.command),)))
        self.count_call("sbatch")
        job_id = self.submitter(folder, parameters, fn, *args).strip()
        if not job_id.isdigit():
            raise SlurmError(f"submitting job {job.name} gave {job_id!r} where a job id was expected")
        script = Path(str(folder).replace("%j", job_id)) / f"{job_id}_submission.sh"   # where submitit keeps it
        link = self.script_path(job)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(script, link.parent))
        return job_id

    def reattach(self, job_id: str, folder: Path, nodes: int = 1) -> submitit.SlurmJob[Any]:
        """submitit's handle on a job submitted earlier (after a restart): its log and result paths per node.

        `folder` is the job's submitit folder (`submitit_folder(log_dir)`). Ask `poll` for its state: the
        handle's own state queries run sacct outside this backend's runner and count."""
        import submitit

        return submitit.SlurmJob(folder=folder, job_id=job_id, tasks=tuple(range(nodes)))

    def poll(self, refs: Sequence[JobRef]) -> dict[str, JobStatus]:
        """One `squeue --me` for every ref; then one `sacct` for the refs squeue does not show as theirs.

        SlurmError when squeue fails; when sacct fails, the jobs only it could tell are absent. Where sacct
        has several jobs under one id (Slurm reused it), the one a ref submitted wins, else the queue's, else
        the latest."""
        by_id: dict[str, list[JobRef]] = {}
        for ref in refs:
            by_id.setdefault(ref.job_id, []).append(ref)
        if not by_id:
            return {}
        out: dict[str, JobStatus] = {}
        for st in self._poll_squeue():
            if st.job_id in by_id:
                out[st.job_id] = st
        # an id asked by several refs (Slurm gave it to each in turn) answers with the job any of them owns
        later = [r for job_id, rs in by_id.items() if not (job_id in out and any(owned(r, out[job_id]) for r in rs))
                 for r in rs]
        if not later:
            return out
        for job_id, found in self._poll_sacct(later).items():
            mine = [st for st in found if any(owned(r, st) for r in by_id[job_id])]
            if mine:
                out[job_id] = mine[-1]
            elif job_id not in out:
                out[job_id] = found[-1]   # the latest
        return out

    def find_by_name(self, name: str) -> JobStatus | None:
        """Our queued or running job called `name` (one `squeue --me`), or None."""
        return next((st for st in self._poll_squeue() if st.name == name), None)

    def _poll_squeue(self) -> list[JobStatus]:
        found = []
        for line in self._run(["squeue", "--me", "-h", "-o", POLL_SQUEUE_FORMAT]).splitlines():
            parts = line.split("|")
            if len(parts) < 7 or not parts[0].strip():
                continue
            state, submit, nodes, reason, end = parts[-5:]
            name = "|".join(parts[1:-5])   # a job name may hold '|'; no other field does
            for one in _expand_array(parts[0].strip()):
                found.append(JobStatus(one, normalise_state(state), "", _clean(nodes), _clean(reason), "squeue",
                                       name=name, submit=_clean(submit), end=_clean(end)))
        return found

    def _poll_sacct(self, refs: Sequence[JobRef]) -> dict[str, list[JobStatus]]:
        wanted = {r.job_id for r in refs}
        known = [r.submit for r in refs if r.submit]
        if len(known) < len(refs):
            known.append((self.now() - POLL_LOOKBACK).strftime("%Y-%m-%dT%H:%M:%S"))
        user = self.user or getpass.getuser()
        try:
            text = self._run(["sacct", "-u", user, "-X", "-n", "-P", "-S", min(known), "-o", POLL_SACCT_FIELDS])
        except SlurmError:
            return {}
        found: dict[str, list[JobStatus]] = {}
        for line in text.splitlines():
            parts = line.split("|")
            if len(parts) < 8 or not parts[0].strip():
                continue
            state, submit, nodes, reason, code, end = parts[-6:]
            reason = state.strip() if "CANCELLED by" in state else _clean(reason)
            for one in _expand_array(parts[0].strip()):
                if one in wanted:
                    found.setdefault(one, []).append(JobStatus(
                        one, normalise_state(state), code.strip(), _clean(nodes), reason, "sacct",
                        name="|".join(parts[1:-6]), submit=_clean(submit), end=_clean(end)))
        for rows in found.values():
            rows.sort(key=lambda st: st.submit)
        return found

    def tasks(self, job_id: str) -> dict[str, JobStatus]:
        """Every task of a job (one entry for a plain job; ID_N per array task), from sacct, else squeue."""
        last = ""
        for attempt in range(self.retries + 1):
            found, why = self._sacct(job_id)
            if not found:
                queued, qwhy = self._squeue(job_id)
                found, why = queued, f"{why}; {qwhy}"
            if found:
                return found
            last = why
            if attempt < self.retries:
                self.sleep(self.retry_wait_s * (attempt + 1))
        raise SlurmError(f"job {job_id} is unknown to Slurm after {self.retries + 1} tries ({last}); it may never have "
                         f"been submitted, or accounting and the controller both forgot it")

    def status(self, job_id: str) -> JobStatus:
        """The job's state (for an array: the job as a whole — active while any task is)."""
        tasks = self.tasks(job_id)
        if job_id in tasks:
            return tasks[job_id]
        states = list(tasks.values())
        active = [t for t in states if t.active]
        pick = (active or [t for t in states if t.state != "COMPLETED"] or states)[0]
        return JobStatus(job_id, pick.state, pick.exit_code, pick.nodes, pick.reason, pick.source)

    def cancel(self, job_id: str) -> None:
        """scancel the job; already finished is fine."""
        try:
            self._run(["scancel", job_id])
        except SlurmError as exc:
            if "already completing or completed" not in str(exc).lower() and "invalid job id" not in str(exc).lower():
                raise

    def in_queue(self, job_id: str) -> bool:
        """Whether squeue still lists the job (pending, running or completing)."""
        found, _ = self._squeue(job_id)
        return any(s.state in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED") for s in found.values())

    def partitions(self) -> dict[str, PartitionInfo]:
        """Partitions by name (sinfo), the default one marked."""
        out: dict[str, PartitionInfo] = {}
        for line in self._run(["sinfo", "-h", "-o", "%P|%a|%D"]).splitlines():
            parts = line.strip().split("|")
            if len(parts) != 3 or not parts[0]:
                continue
            name, default = parts[0].rstrip("*"), parts[0].endswith("*")
            prev = out.get(name)
            nodes = int(parts[2]) if parts[2].isdigit() else 0
            out[name] = PartitionInfo(name, default, parts[1] == "up", nodes + (prev.nodes if prev else 0))
        return out

    def nodes(self, partition: str | None) -> list[SlurmNode]:
        """The partition's nodes (every node without one), their state and the GPUs allocated on each: one
        `scontrol show node --oneliner`."""
        from scepsy_hpc.topology.slurmnodes import parse_scontrol_nodes

        nodes = parse_scontrol_nodes(self._run(["scontrol", "show", "node", "--oneliner"]), "scontrol show node")
        return [n for n in nodes if partition is None or partition in n.partitions]

    def preflight(self, partition: str | None, placement: Sequence[PlacementEntry]) -> str:
        """Check the partition and the placement against the live Slurm before anything is submitted; the partition used."""
        parts = self.partitions()
        if partition is None:
            partition = next((p.name for p in parts.values() if p.default), None)
            if partition is None:
                raise SlurmError("Slurm has no default partition: set slurm.partition in the cluster spec or pass --partition")
        if partition not in parts:
            raise SlurmError(f"partition {partition!r} does not exist on this cluster (it has {', '.join(sorted(parts)) or 'none'}); "
                             f"fix slurm.partition in the cluster spec or pass --partition; nothing was submitted")
        _, nodes = discover(self._run, partition)
        by_name = {n.name: n for n in nodes}
        used = {(p.node, g) for p in placement for g in p.gpus}
        have = sum(n.gpus for n in nodes)
        if len(used) > have:
            raise InfeasibleError(f"the plan needs {len(used)} GPUs; partition {partition!r} has {have} ({len(nodes)} node(s)); "
                                  f"nothing was submitted: re-plan with `scepsy plan --cluster` for this partition")
        for node in sorted({p.node for p in placement}):
            n = by_name.get(node)
            if n is None:
                raise SpecError(f"the placement uses node {node!r}, which partition {partition!r} does not have "
                                f"({', '.join(sorted(by_name)) or 'no nodes'}); re-plan with `scepsy plan --cluster`; "
                                f"nothing was submitted")
            top = max((g for nn, g in used if nn == node), default=-1)
            if top >= n.gpus:
                raise SpecError(f"the placement uses GPU {top} of node {node!r}, which has {n.gpus} GPU(s); re-plan; "
                                f"nothing was submitted")
            if not n.usable:
                raise SlurmError(f"node {node!r} is {n.state}: re-plan without it (`scepsy plan --cluster` skips such nodes); "
                                 f"nothing was submitted")
        return partition

    def _sacct(self, job_id: str) -> tuple[dict[str, JobStatus], str]:
        try:
            text = self._run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", SACCT_FIELDS])
        except SlurmError as exc:
            return {}, f"sacct failed: {exc}"
        found: dict[str, JobStatus] = {}
        for line in text.splitlines():
            parts = line.split("|")
            if len(parts) < 4 or not parts[0].strip():
                continue
            jid, state, code, nodes = (p.strip() for p in parts[:4])
            reason = parts[4].strip() if len(parts) > 4 else ""
            if "CANCELLED by" in state:
                reason = state
            for one in _expand_array(jid):
                found[one] = JobStatus(one, normalise_state(state), code, "" if nodes == "None assigned" else nodes,
                                       "" if reason == "None" else reason, "sacct")
        return found, ("sacct does not list it" if not found else "")

    def _squeue(self, job_id: str) -> tuple[dict[str, JobStatus], str]:
        try:
            text = self._run(["squeue", "-h", "-j", job_id, "-o", SQUEUE_FORMAT])
        except SlurmError as exc:
            # squeue exits 1 with "Invalid job id specified" once the controller has forgotten the job
            return {}, f"squeue: {exc}"
        found: dict[str, JobStatus] = {}
        for line in text.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 2 or not parts[0]:
                continue
            for one in _expand_array(parts[0]):
                found[one] = JobStatus(one, normalise_state(parts[1]), "", parts[2] if len(parts) > 2 else "",
                                       parts[3] if len(parts) > 3 and parts[3] != "None" else "", "squeue")
        return found, ("squeue does not list it" if not found else "")
