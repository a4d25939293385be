"""The local backend: a job is a process group on this machine, one command per node name.

The rendered script (slurm/local.sh.tmpl) is kept beside the logs like an sbatch script. The job id is
`local-PID`; a wrapper records the exit code in `<log_dir>/<name>.rc`, and a cancel leaves a
`.cancelled` mark, so the state survives the process that submitted it (`scepsy status` and `down`
run as other processes). States use Slurm's names.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from scepsy_hpc.backend.base import ClusterBackend, JobStatus, NodeJob, PartitionInfo
from scepsy_hpc.backend.templates import quote, render_local
from scepsy_hpc.engine.supervisor import group_alive, start, stop_group
from scepsy_hpc.errors import SlurmError, SpecError
from scepsy_hpc.spec.placement_entry import PlacementEntry
from scepsy_hpc.spec.records import write_atomic

LOCAL_PARTITION = "local"   # the one partition the local backend has: this machine


class LocalBackend(ClusterBackend):
    """Jobs as local process groups; `jobs_dir` maps job ids to their log directories."""

    name = "local"

    def __init__(self, jobs_dir: Path) -> None:
        self.jobs_dir = jobs_dir

    def submit(self, job: NodeJob) -> str:
        """Write the script beside the logs and start it in its own session."""
        script = self.script_path(job)
        write_atomic(script, render_local(job))
        rc_path = job.log_dir / f"{job.name}.rc"
        rc_path.unlink(missing_ok=True)
        # the wrapper shell records the exit code even when the script is killed by a signal
        wrapper = f"bash {quote(script)}; echo $? > {quote(rc_path)}"
        proc = start(["bash", "-c", wrapper], job.log_dir / "job-local.out", what=f"local job {job.name}",
                     cwd=job.workdir, append=True)
        job_id = f"local-{proc.pid}"
        write_atomic(self.jobs_dir / job_id, f"{job.log_dir}\n{job.name}\n{','.join(job.nodes)}\n")
        return job_id

    def _record(self, job_id: str) -> tuple[int, Path, str, str]:
        path = self.jobs_dir / job_id
        try:
            log_dir, name, nodes = path.read_text().splitlines()[:3]
            pid = int(job_id.split("-", 1)[1])
        except (OSError, ValueError, IndexError):
            raise SlurmError(f"local job {job_id!r} is unknown here (no record in {self.jobs_dir})") from None
        return pid, Path(log_dir), name, nodes

    def status(self, job_id: str) -> JobStatus:
        """RUNNING while the process group lives; then COMPLETED, FAILED or CANCELLED."""
        pid, log_dir, name, nodes = self._record(job_id)
        if group_alive(pid):
            return JobStatus(job_id, "RUNNING", "", nodes, "", "local")
        cancelled = (log_dir / f"{name}.cancelled").exists()
        try:
            code = int((log_dir / f"{name}.rc").read_text().strip() or "-1")
        except (OSError, ValueError):
            code = -1  # killed together with its wrapper
        state = "CANCELLED" if cancelled else "COMPLETED" if code == 0 else "FAILED"
        return JobStatus(job_id, state, f"{code}:0", nodes, "cancelled by scepsy down" if cancelled else "", "local")

    def cancel(self, job_id: str, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `grace_s`."""
        pid, log_dir, name, _ = self._record(job_id)
        if not group_alive(pid):
            return
        (log_dir / f"{name}.cancelled").touch()
        stop_group(pid, grace_s)

    def in_queue(self, job_id: str) -> bool:
        """Whether the job still runs."""
        return self.status(job_id).active

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
