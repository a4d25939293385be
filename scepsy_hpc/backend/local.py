"""The local backend: a job is a process group on this machine, one command per node name.

The rendered script (slurm/local.sh.tmpl) is kept beside the logs like an sbatch script. The job id is
`local-PID`; its record in `jobs_dir` holds the log directory, the name, the node names and the submit
time; a wrapper records the exit code in `<log_dir>/<name>.rc`, and a cancel leaves a `.cancelled`
mark, so the state survives the process that submitted it (`scepsy status` and `down` run as other
processes). States use Slurm's names. `poll` (the seam's default: `status` per job) reads the records
and runs no command; a reused PID rewrites the record, so `owned` tells the new job from the old.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from scepsy_hpc.backend.base import ClusterBackend, JobStatus, NodeJob, PartitionInfo
from scepsy_hpc.backend.templates import quote, render_local, walltime_seconds
from scepsy_hpc.engine.supervisor import group_alive, start, stop_group
from scepsy_hpc.errors import SlurmError, SpecError
from scepsy_hpc.spec.placement_entry import PlacementEntry
from scepsy_hpc.spec.records import PRIVATE, write_atomic
from scepsy_hpc.topology.model import SlurmNode

LOCAL_PARTITION = "local"   # the one partition the local backend has: this machine
KILL_WAIT_S = 10            # after a walltime's SIGTERM, SIGKILL this much later (Slurm's KillWait)


def _iso(timestamp: float) -> str:
    """A POSIX time as Slurm prints times: local, to the second (2026-12-06T01:50:00)."""
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%dT%H:%M:%S")


@dataclass(frozen=True)
class _Record:
    """What `submit` wrote about a job in jobs_dir."""

    pid: int
    log_dir: Path
    name: str
    nodes: str
    submit: str
    limit: int | None = None     # walltime in seconds
    gpus: int = 0                # GPUs per node it holds


class LocalBackend(ClusterBackend):
    """Jobs as local process groups; `jobs_dir` maps job ids to their log directories."""

    name = "local"

    def __init__(self, jobs_dir: Path, nodes: Mapping[str, int] | None = None) -> None:
        """`nodes` (name → GPUs), when given, makes the backend answer `nodes()` like a cluster of that shape
        whose GPUs are held by this backend's running jobs (`node_states` sets a node's state, e.g. "drained")."""
        super().__init__()
        self.jobs_dir = jobs_dir
        self.capacity = dict(nodes) if nodes is not None else None
        self.node_states: dict[str, str] = {}

    def submit(self, job: NodeJob) -> str:
        """Write the script beside the logs and start it in its own session."""
        script = self.script_path(job)
        for d in (self.jobs_dir, job.log_dir):   # the owner's only, whatever the umask (write_atomic's would follow it)
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(script, render_local(job), mode=PRIVATE)
        rc_path = job.log_dir / f"{job.name}.rc"
        rc_path.unlink(missing_ok=True)
        # the wrapper shell records the exit code even when the script is killed by a signal
        limit = walltime_seconds(job.time) if job.time else None
        # like Slurm, a walltime ends the job: SIGTERM at the limit, SIGKILL KILL_WAIT_S later (state TIMEOUT)
        run = (f"timeout --foreground -k {KILL_WAIT_S} {limit} bash {quote(script)}" if limit  # stays in the job's group
               else f"bash {quote(script)}")
        wrapper = f"{run}; echo $? > {quote(rc_path)}"
        self.count_call("bash")
        proc = start(["bash", "-c", wrapper], job.log_dir / "job-local.out", what=f"local job {job.name}",
                     cwd=job.workdir, append=True)
        job_id = f"local-{proc.pid}"
        write_atomic(self.jobs_dir / job_id,
                     f"{job.log_dir}\n{job.name}\n{','.join(job.nodes)}\n{_iso(time.time())}\n{limit or ''}\n"
                     f"{job.gpus_per_node}\n", mode=PRIVATE)
        return job_id

    def _record(self, job_id: str) -> _Record:
        path = self.jobs_dir / job_id
        try:
            lines = path.read_text().splitlines()
            log_dir, name, nodes = lines[:3]
            # records written before the submit time was kept have three lines: the record's own time stands in
            submit = lines[3] if len(lines) > 3 else _iso(path.stat().st_mtime)
            limit = int(lines[4]) if len(lines) > 4 and lines[4] else None
            gpus = int(lines[5]) if len(lines) > 5 and lines[5] else 0
            pid = int(job_id.split("-", 1)[1])
        except (OSError, ValueError, IndexError):
            raise SlurmError(f"local job {job_id!r} is unknown here (no record in {self.jobs_dir})") from None
        return _Record(pid, Path(log_dir), name, nodes, submit, limit, gpus)

    def find_by_name(self, name: str) -> JobStatus | None:
        """The job recorded under `name` (the newest if several), or None."""
        found = []
        for path in self.jobs_dir.glob("local-*"):
            try:
                st = self.status(path.name)
            except SlurmError:
                continue
            if st.name == name:
                found.append((st.submit, st))
        return max(found, key=lambda x: x[0])[1] if found else None

    def status(self, job_id: str) -> JobStatus:
        """RUNNING while the process group lives; then COMPLETED, FAILED or CANCELLED."""
        rec = self._record(job_id)
        if group_alive(rec.pid):
            end = _iso(dt.datetime.fromisoformat(rec.submit).timestamp() + rec.limit) if rec.limit else ""
            return JobStatus(job_id, "RUNNING", "", rec.nodes, "", "local", name=rec.name, submit=rec.submit, end=end)
        cancelled = (rec.log_dir / f"{rec.name}.cancelled").exists()
        rc_path = rec.log_dir / f"{rec.name}.rc"
        try:
            code = int(rc_path.read_text().strip() or "-1")
            end = _iso(rc_path.stat().st_mtime)
        except (OSError, ValueError):
            code, end = -1, ""  # killed together with its wrapper
        timed_out = rec.limit is not None and code in (124, 137) and not cancelled
        state = "CANCELLED" if cancelled else "TIMEOUT" if timed_out else "COMPLETED" if code == 0 else "FAILED"
        reason = "cancelled by scepsy" if cancelled else f"walltime of {rec.limit} s" if timed_out else ""
        return JobStatus(job_id, state, f"{code}:0", rec.nodes, reason, "local",
                         name=rec.name, submit=rec.submit, end=end)

    def cancel(self, job_id: str, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `grace_s`."""
        rec = self._record(job_id)
        if not group_alive(rec.pid):
            return
        (rec.log_dir / f"{rec.name}.cancelled").touch()
        stop_group(rec.pid, grace_s)

    def in_queue(self, job_id: str) -> bool:
        """Whether the job still runs."""
        return self.status(job_id).active

    def nodes(self, partition: str | None) -> list[SlurmNode] | None:
        """The nodes given to the constructor, each GPU held by a running job of this backend counted as allocated;
        None without them (a node name is then only a label)."""
        if self.capacity is None:
            return None
        used = dict.fromkeys(self.capacity, 0)
        for path in self.jobs_dir.glob("local-*"):
            try:
                rec = self._record(path.name)
            except SlurmError:
                continue
            if group_alive(rec.pid):
                for node in rec.nodes.split(","):
                    if node in used:
                        used[node] += rec.gpus
        return [SlurmNode(name=n, gpus=g, gpus_alloc=min(g, used[n]), state=self.node_states.get(n, "idle"),
                          partitions=(LOCAL_PARTITION,)) for n, g in sorted(self.capacity.items())]

    def partitions(self) -> dict[str, PartitionInfo]:
        """This machine, as the one default partition."""
        return {LOCAL_PARTITION: PartitionInfo(LOCAL_PARTITION, True, True, 1)}

    def preflight(self, partition: str | None, placement: Sequence[PlacementEntry]) -> str | None:
        """What a local run needs: something to run and bash for the job script; the partition is not used here."""
        if not placement:
            raise SpecError("the placement is empty: nothing to start")
        if shutil.which("bash") is None:
            raise SpecError("the local backend runs its job script with bash, which is not on PATH here")
        return partition
