"""The local backend: a job is a process group on this machine, one command per node name.

The rendered script (slurm/local.sh.tmpl) is kept beside the logs like an sbatch script. The job id is
`local-PID`; a wrapper records the exit code in `<log_dir>/<name>.rc`, and a cancel leaves a
`.cancelled` mark, so the state survives the process that submitted it (`scepsy status` and `down`
run as other processes). States use Slurm's names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from scepsy_hpc.backend.base import ClusterBackend, JobStatus, NodeJob
from scepsy_hpc.backend.templates import quote, render_local
from scepsy_hpc.errors import SlurmError


def _alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of the job's process group remains.

    A zombie still answers killpg(…, 0); under a PID 1 that never reaps (a container without an
    init) the cancelled script's shell would look alive forever, so /proc decides where it exists."""
    try:
        os.waitpid(pgid, os.WNOHANG)   # reap the leader if it is our own child
    except ChildProcessError:
        pass
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue   # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class LocalBackend(ClusterBackend):
    """Jobs as local process groups; `jobs_dir` maps job ids to their log directories."""

    name = "local"

    def __init__(self, jobs_dir: Path) -> None:
        self.jobs_dir = jobs_dir

    def submit(self, job: NodeJob) -> str:
        """Write the script beside the logs and start it in its own session."""
        job.log_dir.mkdir(parents=True, exist_ok=True)
        script = self.script_path(job)
        script.write_text(render_local(job))
        rc_path = job.log_dir / f"{job.name}.rc"
        rc_path.unlink(missing_ok=True)
        out = open(job.log_dir / "job-local.out", "ab")
        # the wrapper shell records the exit code even when the script is killed by a signal
        wrapper = f"bash {quote(script)}; echo $? > {quote(rc_path)}"
        proc = subprocess.Popen(["bash", "-c", wrapper], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(job.workdir))
        out.close()
        job_id = f"local-{proc.pid}"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        (self.jobs_dir / job_id).write_text(f"{job.log_dir}\n{job.name}\n{','.join(job.nodes)}\n")
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
        if _alive(pid):
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
        if not _alive(pid):
            return
        (log_dir / f"{name}.cancelled").touch()
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def in_queue(self, job_id: str) -> bool:
        """Whether the job still runs."""
        return self.status(job_id).active
