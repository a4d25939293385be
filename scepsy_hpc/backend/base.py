"""The `ClusterBackend` seam: where jobs run (a Slurm cluster, or processes on this machine).

A backend runs a `NodeJob` — one command (or, on Slurm, the node agent of a session) started once on
each of a set of nodes, holding GPUs there — and reports its state, normalised to Slurm's job state
names. `slurm` asks a real Slurm (submitit's sbatch, sacct with squeue as fallback, scancel); `local`
runs the command as processes here, one per node name, which is the embedded default;
`scepsy_hpc.backend.fake.FakeSlurm` stands in for the Slurm commands in unit tests.

A daemon watching many jobs asks `poll(refs)`: one answer for all of them (on Slurm one squeue, plus
one sacct for those that left the queue), and `owned(ref, status)` tells whether the job under an id
is still the one it submitted — Slurm reuses job ids (after a controller reset they start again at 1).
Every external command a backend runs is counted in `calls`, so the caller can see its load on Slurm.
"""

from __future__ import annotations

import collections
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from scepsy_hpc.errors import ScepsyError, SpecError
from scepsy_hpc.spec.placement_entry import PlacementEntry
from scepsy_hpc.topology.model import SlurmNode

# Slurm's job states (sacct/squeue long names). A job in ACTIVE may still run; the rest are final.
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                    "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "SPECIAL_EXIT"})
FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE", "REVOKED"})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def normalise_state(text: str) -> str:
    """'CANCELLED by 0' → CANCELLED, 'RUNNING+' → RUNNING; an unknown word is kept as it is."""
    word = text.strip().split(" ")[0].rstrip("+").upper()
    return word or "UNKNOWN"


def check_name(value: str, what: str) -> str:
    """A Slurm identifier we put into scripts (partition, account, qos, session name): letters, digits, . _ -."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value):
        raise SpecError(f"{what} {value!r}: use 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit); "
                        f"anything else could not be passed to Slurm safely")
    return value


@dataclass(frozen=True)
class JobStatus:
    """One job (or array task) as its backend sees it."""

    job_id: str
    state: str                 # a Slurm state name, see ACTIVE / FINAL
    exit_code: str = ""        # sacct's "rc:signal", or the process's code
    nodes: str = ""            # hostlist the job runs on
    reason: str = ""           # why it is pending, or who cancelled it
    source: str = ""           # sacct, squeue, local
    name: str = ""             # the job's name
    submit: str = ""           # when it was submitted, as Slurm prints it (2026-12-06T01:50:00, local time)
    end: str = ""              # when it ended (or, while it runs, when its time limit ends it); "" if unknown

    @property
    def active(self) -> bool:
        """Not yet finished."""
        return self.state in ACTIVE

    @property
    def running(self) -> bool:
        """Started and not finished."""
        return self.state in ("RUNNING", "COMPLETING", "CONFIGURING")


@dataclass(frozen=True)
class JobRef:
    """A job as its submitter knows it: the id, and the name and submit time that make the id its own."""

    job_id: str
    name: str
    submit: str = ""           # as in JobStatus.submit; "" while not yet known (then only id and name are compared)


def owned(ref: JobRef, status: JobStatus) -> bool:
    """Whether `status` is the job `ref` submitted, not another job that got the same id later."""
    return (status.job_id == ref.job_id and status.name == ref.name
            and (ref.submit == "" or status.submit == ref.submit))


@dataclass(frozen=True)
class PartitionInfo:
    """A partition jobs can be submitted to (sinfo's view; the local backend has one: this machine)."""

    name: str
    default: bool
    available: bool
    nodes: int


@dataclass(frozen=True)
class NodeJob:
    """Run `command` once on each node in `nodes` (in order), each holding `gpus_per_node` GPUs."""

    name: str
    command: tuple[str, ...]
    nodes: tuple[str, ...]
    gpus_per_node: int
    log_dir: Path
    workdir: Path
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None            # walltime, Slurm syntax (4:00:00, 1-00:00:00)
    switches: int | None = None        # at most this many leaf switches (Slurm --switches)
    switches_wait: str | None = None   # how long Slurm may wait for that (--switches=N@wait)
    constraint: str | None = None
    gres_type: str | None = None       # the GRES type to ask for (gpu:TYPE:N); None: any GPU
    cpus_per_node: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    # the session directory: when given, a Slurm job runs the session's node agent in submitit's task
    # (scepsy_hpc.backend.agent.job_main) instead of `command`; the local backend always runs `command`
    session: Path | None = None


CALLS_KEPT = 10_000   # how many of the latest backend commands `ClusterBackend.calls` remembers


class ClusterBackend(ABC):
    """Submit, watch and cancel jobs."""

    name: str = ""

    def __init__(self) -> None:
        # (time.monotonic(), command word) of every external command this backend ran, newest last
        self.calls: collections.deque[tuple[float, str]] = collections.deque(maxlen=CALLS_KEPT)

    def count_call(self, word: str) -> None:
        """Note that the external command `word` (sbatch, squeue, …) is being run."""
        self.calls.append((time.monotonic(), word))

    def calls_in(self, window_s: float) -> int:
        """How many external commands this backend ran in the last `window_s` seconds."""
        since, n = time.monotonic() - window_s, 0
        for t, _ in reversed(self.calls):   # newest first: stop at the first one outside the window
            if t < since:
                break
            n += 1
        return n

    @abstractmethod
    def submit(self, job: NodeJob) -> str:
        """Start `job`, its script kept beside its logs (`script_path`); return its job id."""

    @abstractmethod
    def status(self, job_id: str) -> JobStatus:
        """The job's state now; SlurmError if the backend cannot tell (never a silent UNKNOWN)."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Cancel the job (a job already finished is not an error)."""

    @abstractmethod
    def in_queue(self, job_id: str) -> bool:
        """Whether the job is still pending or running (so a cancel has not yet taken effect)."""

    def poll(self, refs: Sequence[JobRef]) -> dict[str, JobStatus]:
        """What the backend knows of each ref's job id, by id (an id it does not know is absent).

        The answer for an id may be another job that got the id later: check it with `owned`. This
        default asks `status` once per job; a backend that can answer many jobs at once overrides it."""
        out: dict[str, JobStatus] = {}
        for job_id in dict.fromkeys(r.job_id for r in refs):
            try:
                out[job_id] = self.status(job_id)
            except ScepsyError:
                pass
        return out

    def find_by_name(self, name: str) -> JobStatus | None:
        """The job called `name` (job names carry a nonce, so at most one is ours), or None. For a daemon that
        stopped between submitting a job and recording its id; this default cannot tell."""
        return None

    def nodes(self, partition: str | None) -> list[SlurmNode] | None:
        """The partition's nodes with their state and the GPUs jobs hold there (one command), or None when the
        backend has no nodes of its own to choose from (local: a node name is only a label)."""
        return None

    @abstractmethod
    def partitions(self) -> dict[str, PartitionInfo]:
        """Partitions by name, the default one marked."""

    @abstractmethod
    def preflight(self, partition: str | None, placement: Sequence[PlacementEntry]) -> str | None:
        """Check that `placement` can run on `partition` before anything is submitted; the partition to use."""

    def cancel_and_wait(self, job_id: str, timeout_s: float = 90.0, *,
                        sleep: Callable[[float], None] = time.sleep) -> bool:
        """Cancel and wait until the job has left the queue; whether it did within `timeout_s`."""
        try:
            self.cancel(job_id)
        except ScepsyError:
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if not self.in_queue(job_id):
                    return True
            except ScepsyError:
                return True   # the backend no longer knows the job: it is not queued
            sleep(0.5)
        return False

    def script_path(self, job: NodeJob) -> Path:
        """Where the rendered script of `job` is kept: beside its logs."""
        return job.log_dir / f"{job.name}.sh"
