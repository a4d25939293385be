"""The Slurm backend: sbatch for the serving job, sacct (then squeue) for state, scancel.

Every Slurm command goes through an injected runner (argv → stdout, raising SlurmError), so the unit
tests drive `FakeSlurm` and the integration tests a real cluster through the same code. Job state
comes from `sacct` — it knows finished jobs and who cancelled them — and from `squeue` when sacct does
not know the job yet (slurmdbd lags submission by a moment) or accounting is off. A job that neither
knows is retried, then reported as an error naming both answers: never a silent UNKNOWN.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Sequence

from scepsy_hpc.backend.base import ClusterBackend, JobStatus, NodeJob, PartitionInfo, normalise_state
from scepsy_hpc.backend.templates import render_sbatch
from scepsy_hpc.errors import InfeasibleError, SlurmError, SpecError
from scepsy_hpc.spec.placement_entry import PlacementEntry
from scepsy_hpc.topology.discover import Runner, discover, run_command

__all__ = ["PartitionInfo", "SlurmBackend"]

SACCT_FIELDS = "JobID,State,ExitCode,NodeList,Reason"
SQUEUE_FORMAT = "%i|%T|%N|%r"
_ARRAY_RANGE = re.compile(r"^(\d+)_\[([^\]]+)\]$")


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

    def __init__(self, run: Runner = run_command, *, retries: int = 5, retry_wait_s: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.run = run
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self.sleep = sleep

    def submit(self, job: NodeJob) -> str:
        """Render the sbatch script beside the logs, submit it, return the job id."""
        script = self.script_path(job)
        job.log_dir.mkdir(parents=True, exist_ok=True)
        script.write_text(render_sbatch(job))
        out = self.run(["sbatch", "--parsable", str(script)])
        job_id = out.strip().splitlines()[-1].split(";")[0].strip() if out.strip() else ""
        if not job_id.isdigit():
            raise SlurmError(f"`sbatch --parsable {script}` printed {out.strip()!r} where a job id was expected")
        return job_id

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
            self.run(["scancel", job_id])
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
        for line in self.run(["sinfo", "-h", "-o", "%P|%a|%D"]).splitlines():
            parts = line.strip().split("|")
            if len(parts) != 3 or not parts[0]:
                continue
            name, default = parts[0].rstrip("*"), parts[0].endswith("*")
            prev = out.get(name)
            nodes = int(parts[2]) if parts[2].isdigit() else 0
            out[name] = PartitionInfo(name, default, parts[1] == "up", nodes + (prev.nodes if prev else 0))
        return out

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
        _, nodes = discover(self.run, partition)
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
            text = self.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", SACCT_FIELDS])
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
            text = self.run(["squeue", "-h", "-j", job_id, "-o", SQUEUE_FORMAT])
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
