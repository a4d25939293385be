"""`FakeSlurm`: an in-memory Slurm for unit tests of code that talks to Slurm through a runner.

It is a `Runner` (argv → stdout, raising SlurmError like `run_command`), so it drops in for
`SlurmBackend(run=fake)` and `discover(run=fake)`, and its `submitter` drops in for submitit
(`SlurmBackend(run=fake, submitter=fake.submitter)`: submitit's script, submitted with sbatch through
the fake, nothing pickled). It answers exactly the command lines our code sends (sbatch --parsable,
squeue/sacct with our formats — by job id, and every job of a user for `poll` — scancel, sinfo,
scontrol show node/topology) the way Slurm 22-24 prints them; any other command line raises, so a test
notices an unexpected command.

Limits: jobs only move when the test says so (`start`, `finish`, `forget`, `recycle`): there is no
scheduler, no walltime, no array throttle and no GPU accounting across jobs. The clock (submit and end
times) moves one second per submission and when a test calls `advance`. sbatch reads `#SBATCH
--key=value` lines only (values unquoted as sbatch does; not `-p gpu`, not command-line options) and
checks the partition, --nodes, --nodelist and --gres against the configured nodes; every other option
is only recorded in `FakeJob.options`. squeue's %e (a running job's expected end) is always N/A.
"""

from __future__ import annotations

import datetime as dt
import getpass
import itertools
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from hostlist import collect_hostlist

from scepsy_hpc.backend.base import ACTIVE
from scepsy_hpc.errors import SlurmError
from scepsy_hpc.spec.hostlist import expand_hostlist

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"   # how Slurm prints times (SLURM_TIME_FORMAT unset)


def _ranges(numbers: Iterable[int]) -> str:
    """1,2,3,5 → '1-3,5' (Slurm's range form)."""
    out = []
    for _, run in itertools.groupby(enumerate(sorted(set(numbers))), lambda pair: pair[1] - pair[0]):
        nums = [n for _, n in run]
        out.append(str(nums[0]) if len(nums) == 1 else f"{nums[0]}-{nums[-1]}")
    return ",".join(out)


def hostlist(names: Sequence[str]) -> str:
    """node1,node2,node4 → node[1-2,4], as Slurm prints node lists (sorted, zero padding kept: node[01-02])."""
    return collect_hostlist(list(names))


@dataclass
class FakeTask:
    """One plain job, or one task of an array."""

    state: str = "PENDING"
    exit_code: str = "0:0"
    nodes: tuple[str, ...] = ()
    reason: str = "Resources"
    end: str = ""             # when it ended (the fake clock's time); "" while active


@dataclass
class FakeJob:
    """A submitted job: its #SBATCH options and its tasks (key None for a plain job)."""

    job_id: int
    script: Path
    options: dict[str, str]
    partition: str
    tasks: dict[int | None, FakeTask]
    throttle: str = ""
    sacct_queries: int = 0
    forgotten: bool = False   # squeue no longer knows it (MinJobAge passed); sacct still does
    name: str = ""
    submit: str = ""          # the fake clock's time at sbatch
    user: str = ""
    entry: tuple[Any, ...] = ()   # (fn, *args) a submitter was asked to run (nothing runs it)


@dataclass
class FakeSlurm:
    """A stateful fake of sbatch/squeue/sacct/scancel/sinfo/scontrol; call it with an argv."""

    partitions: Mapping[str, Sequence[str]] = field(default_factory=lambda: {"gpu": ["node1", "node2", "node3", "node4"]})
    default_partition: str | None = "gpu"
    gpus_per_node: int = 4
    gres_type: str | None = "h100"
    switches: Mapping[str, Sequence[str]] | None = None   # leaf switch → nodes; None: topology/flat
    node_states: dict[str, str] = field(default_factory=dict)   # e.g. {"node2": "IDLE+DRAIN"}; else from jobs
    accounting_lag: int = 0          # sacct prints nothing for a job's first N queries (slurmdbd lags)
    accounting_enabled: bool = True
    cluster: str | None = None       # sbatch --parsable prints "ID;cluster" when set
    user: str = field(default_factory=getpass.getuser)   # who submits (squeue --me, sacct -u)
    clock: dt.datetime = dt.datetime(2026, 12, 6, 1, 50, 0)
    jobs: dict[int, FakeJob] = field(default_factory=dict)
    retired: list[FakeJob] = field(default_factory=list)   # jobs whose id was given to another (sacct keeps them)
    calls: list[list[str]] = field(default_factory=list)

    def __call__(self, argv: Sequence[str]) -> str:
        """Answer one command line as Slurm would."""
        args = [str(a) for a in argv]
        self.calls.append(args)
        match args:
            case ["sbatch", "--parsable", script]:
                return self._sbatch(args, Path(script))
            case ["squeue", "-h", "-j", job_id, "-o", "%i|%T|%N|%r"]:
                return self._squeue(args, job_id)
            case ["squeue", "--me", "-h", "-o", "%i|%j|%T|%V|%N|%r|%e"]:
                return self._squeue_user(self.user)
            case ["squeue", "-u", user, "-h", "-o", "%i|%j|%T|%V|%N|%r|%e"]:
                return self._squeue_user(user)
            case ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode,NodeList,Reason"]:
                return self._sacct(args, job_id)
            case ["sacct", "-u", user, "-X", "-n", "-P", "-S", since, "-o",
                  "JobID,JobName,State,Submit,NodeList,Reason,ExitCode,End"]:
                return self._sacct_user(args, user, since)
            case ["scancel", job_id]:
                return self._scancel(job_id)
            case ["sinfo", "-h", "-o", "%P|%a|%D"]:
                return "".join(f"{p}{'*' if p == self.default_partition else ''}|up|{len(n)}\n"
                               for p, n in self.partitions.items())
            case ["scontrol", "show", "node", "--oneliner"]:
                return "".join(self._node_line(n) + "\n" for n in self._all_nodes())
            case ["scontrol", "show", "topology"]:
                return self._topology(args)
        raise SlurmError(f"fake Slurm does not know `{' '.join(args)}`")

    # -- test controls ------------------------------------------------------------------------------

    def start(self, job_id: str | int, nodes: Sequence[str] | None = None, task: int | None = None) -> None:
        """Run the job (or one array task; every pending task when `task` is None) on `nodes`."""
        job = self.jobs[int(job_id)]
        for _, t in self._select(job, task):
            if t.state == "PENDING":
                t.state, t.reason, t.nodes = "RUNNING", "None", tuple(nodes or self._pick_nodes(job))

    def finish(self, job_id: str | int, state: str = "COMPLETED", exit_code: str = "0:0", task: int | None = None) -> None:
        """End the job (or one array task; every unfinished task when `task` is None) in `state`.

        An ACTIVE state such as COMPLETING is allowed: the job then stays in squeue."""
        job = self.jobs[int(job_id)]
        for _, t in self._select(job, task):
            if t.state in ACTIVE:
                t.state, t.exit_code, t.reason = state, exit_code, "None"
                t.end = "" if state in ACTIVE else self.now()

    def forget(self, job_id: str | int) -> None:
        """squeue no longer knows the job (slurmctld purged it after MinJobAge); sacct still does."""
        self.jobs[int(job_id)].forgotten = True

    def recycle(self, job_id: str | int, name: str, user: str | None = None) -> None:
        """Give the id to another job (named `name`, submitted a minute later, by `user` or by this user), as
        Slurm does after its id counter wraps or its state is reset; sacct keeps the old job."""
        old = self.jobs[int(job_id)]
        old.forgotten = True
        self.retired.append(old)
        self.advance(60)
        self.jobs[int(job_id)] = FakeJob(int(job_id), old.script, {"job-name": name}, old.partition, {None: FakeTask()},
                                         name=name, submit=self.now(), user=user or self.user)

    def advance(self, seconds: float) -> None:
        """Move the fake clock on."""
        self.clock += dt.timedelta(seconds=seconds)

    def now(self) -> str:
        """The fake clock's time, as Slurm prints times."""
        return self.clock.strftime(TIME_FORMAT)

    def submitter(self, folder: Path, parameters: Mapping[str, Any], fn: Callable[..., Any], *args: Any) -> str:
        """A SlurmBackend Submitter: the script submitit would write, submitted with `sbatch --parsable`
        through this fake and kept where submitit keeps it (FOLDER/ID_submission.sh); `fn(*args)` is only
        recorded in the job's `entry`."""
        from scepsy_hpc.backend.templates import sbatch_text

        base = Path(*itertools.takewhile(lambda part: "%j" not in part, Path(folder).absolute().parts))
        base.mkdir(parents=True, exist_ok=True)
        pending = base / f".submission_file_{len(self.calls)}.sh"
        pending.write_text(sbatch_text(folder, parameters))
        job_id = self(["sbatch", "--parsable", str(pending)]).strip().split(";")[0]
        final = Path(str(Path(folder).absolute()).replace("%j", job_id))
        final.mkdir(parents=True, exist_ok=True)
        job = self.jobs[int(job_id)]
        job.script = pending.rename(final / f"{job_id}_submission.sh")
        job.entry = (fn, *args)
        return job_id

    def submitted(self) -> list[list[str]]:
        """The sbatch calls seen so far."""
        return [c for c in self.calls if c[0] == "sbatch"]

    # -- commands -----------------------------------------------------------------------------------

    @staticmethod
    def _fail(args: list[str], message: str, code: int = 1) -> SlurmError:
        return SlurmError(f"`{' '.join(args)}` failed (exit {code}): {message}")

    def _sbatch(self, args: list[str], script: Path) -> str:
        try:
            text = script.read_text()
        except OSError:
            raise self._fail(args, f"sbatch: error: Unable to open file {script}") from None
        opts: dict[str, str] = {}
        for line in text.splitlines()[1:]:   # sbatch reads #SBATCH lines up to the first command
            if line.startswith("#SBATCH"):
                key, _, value = line[len("#SBATCH"):].strip().lstrip("-").partition("=")
                opts[key] = " ".join(shlex.split(value))   # sbatch keeps a quoted value together, quotes removed
            elif line.strip() and not line.startswith("#"):
                break
        refuse = "sbatch: error: Batch job submission failed: "
        partition = opts.get("partition") or self.default_partition
        if partition not in self.partitions:
            raise self._fail(args, refuse + ("Invalid partition name specified" if partition
                                             else "No partition specified or system default partition"))
        have = list(self.partitions[partition])
        wanted = expand_hostlist(opts["nodelist"]) if opts.get("nodelist") else []
        gres = opts.get("gres", "gpu:0").split(":")
        if len(gres) == 3 and gres[1] != self.gres_type:
            raise self._fail(args, refuse + "Invalid generic resource (gres) specification")
        if (int(opts.get("nodes", "1").split("-")[0]) > len(have) or any(n not in have for n in wanted)
                or int(gres[-1]) > self.gpus_per_node):
            raise self._fail(args, refuse + "Requested node configuration is not available")
        keys: list[int | None] = [None]
        throttle = ""
        if "array" in opts:
            spec, _, throttle = opts["array"].partition("%")
            keys = []
            for part in spec.split(","):
                lo, _, hi = part.partition("-")
                keys += range(int(lo), int(hi or lo) + 1)
        job_id = max([*self.jobs, *(j.job_id for j in self.retired)], default=0) + 1
        self.jobs[job_id] = FakeJob(job_id, script, opts, partition, {k: FakeTask() for k in keys}, throttle,
                                    name=opts.get("job-name") or script.name, submit=self.now(), user=self.user)
        self.advance(1)
        return f"{job_id}{';' + self.cluster if self.cluster else ''}\n"

    def _squeue(self, args: list[str], job_id: str) -> str:
        job = self.jobs.get(int(job_id)) if job_id.isdigit() else None
        if job is None or job.forgotten:
            raise self._fail(args, "slurm_load_jobs error: Invalid job id specified")
        return "".join(f"{jid}|{t.state}|{hostlist(t.nodes)}|{t.reason}\n"
                       for jid, t in self._rows(job) if t.state in ACTIVE)

    def _squeue_user(self, user: str) -> str:
        rows = []
        for job in self.jobs.values():
            if job.user != user or job.forgotten:
                continue
            for jid, t in self._rows(job):
                if t.state in ACTIVE:
                    reason = t.reason if t.state == "PENDING" else "None"
                    rows.append(f"{jid}|{job.name}|{t.state}|{job.submit}|{hostlist(t.nodes)}|{reason}|N/A\n")
        return "".join(rows)

    def _sacct_user(self, args: list[str], user: str, since: str) -> str:
        if not self.accounting_enabled:
            raise self._fail(args, "Slurm accounting storage is disabled")
        try:
            dt.datetime.strptime(since, TIME_FORMAT)
        except ValueError:
            raise self._fail(args, f"sacct: error: Invalid time specification (pos=0): {since}") from None
        rows = []
        for job in [*self.retired, *self.jobs.values()]:
            if job.user != user:
                continue
            job.sacct_queries += 1
            if job.sacct_queries <= self.accounting_lag:
                continue
            for jid, t in self._rows(job):
                # sacct -S lists the jobs that were pending or running at or after that time
                if t.state not in ACTIVE and max(job.submit, t.end) < since:
                    continue
                state = "CANCELLED by 0" if t.state == "CANCELLED" else t.state
                reason = t.reason if t.state == "PENDING" else "None"
                rows.append(f"{jid}|{job.name}|{state}|{job.submit}|{hostlist(t.nodes) or 'None assigned'}|{reason}|"
                            f"{t.exit_code}|{t.end or 'Unknown'}\n")
        return "".join(rows)

    def _sacct(self, args: list[str], job_id: str) -> str:
        if not self.accounting_enabled:
            raise self._fail(args, "Slurm accounting storage is disabled")
        job = self.jobs.get(int(job_id)) if job_id.isdigit() else None
        if job is None:
            return ""
        job.sacct_queries += 1
        if job.sacct_queries <= self.accounting_lag:
            return ""
        rows = []
        for jid, t in self._rows(job):
            state = "CANCELLED by 0" if t.state == "CANCELLED" else t.state
            reason = t.reason if t.state == "PENDING" else "None"
            rows.append(f"{jid}|{state}|{t.exit_code}|{hostlist(t.nodes) or 'None assigned'}|{reason}\n")
        return "".join(rows)

    def _scancel(self, job_id: str) -> str:
        # Slurm ≥ 20.11 scancel is silent and exits 0 for a finished or unknown job (plain SIGKILL cancel)
        job = self.jobs.get(int(job_id)) if job_id.isdigit() else None
        for _, t in self._select(job, None) if job else []:
            if t.state in ACTIVE:
                t.state, t.exit_code = "CANCELLED", "0:15" if t.nodes else "0:0"
                t.reason, t.end = "None", self.now()
        return ""

    def _topology(self, args: list[str]) -> str:
        if not self.switches:
            raise self._fail(args, "scontrol: error: No topology information available")
        lines = []
        if len(self.switches) > 1:   # leaves without a common ancestor could not share a job
            lines.append(f"SwitchName=spine Level=1 LinkSpeed=1 Switches={','.join(self.switches)}")
        lines += [f"SwitchName={s} Level=0 LinkSpeed=1 Nodes={hostlist(list(n))}" for s, n in self.switches.items()]
        return "\n".join(lines) + "\n"

    # -- helpers ------------------------------------------------------------------------------------

    def _all_nodes(self) -> list[str]:
        return list(dict.fromkeys(n for nodes in self.partitions.values() for n in nodes))

    def _node_line(self, name: str) -> str:
        g, kind = self.gpus_per_node, f"{self.gres_type}:" if self.gres_type else ""
        used = min(g, sum(int(j.options.get("gres", "gpu:0").split(":")[-1])
                          for j in self.jobs.values() for t in j.tasks.values()
                          if t.state in ("RUNNING", "COMPLETING") and name in t.nodes))
        state = self.node_states.get(name) or ("IDLE" if not used else "MIXED" if used < g else "ALLOCATED")
        parts = ",".join(p for p, nodes in self.partitions.items() if name in nodes)
        idx = _ranges(range(used)) if used else "N/A"
        reason = " Reason=drained by FakeSlurm [root@2024-11-19T22:41:07]" if "DRAIN" in state.upper() else ""
        return (f"NodeName={name} Arch=x86_64 CoresPerSocket=32 CPUAlloc=0 CPUEfctv=64 CPUTot=64 CPULoad=0.01 "
                f"AvailableFeatures={self.gres_type or '(null)'} ActiveFeatures={self.gres_type or '(null)'} "
                f"Gres=gpu:{kind}{g}(S:0-1) GresUsed=gpu:{kind}{used}(IDX:{idx}) NodeAddr={name} NodeHostName={name} "
                f"Version=24.05.4 OS=Linux 5.14.0-427.22.1.el9_4.x86_64 #1 SMP PREEMPT_DYNAMIC  RealMemory=1031000 "
                f"AllocMem=0 FreeMem=1012877 Sockets=2 Boards=1 State={state} ThreadsPerCore=1 TmpDisk=0 Weight=1 "
                f"Owner=N/A MCS_label=N/A Partitions={parts}  BootTime=2024-11-02T08:14:51 "
                f"CfgTRES=cpu=64,mem=1031000M,billing=64,gres/gpu={g} AllocTRES= CurrentWatts=0 AveWatts=0{reason}")

    def _pick_nodes(self, job: FakeJob) -> list[str]:
        if job.options.get("nodelist"):
            return expand_hostlist(job.options["nodelist"])
        return list(self.partitions[job.partition])[:int(job.options.get("nodes", "1").split("-")[0])]

    @staticmethod
    def _select(job: FakeJob, task: int | None) -> list[tuple[int | None, FakeTask]]:
        if task is None:
            return list(job.tasks.items())
        if task not in job.tasks:
            raise KeyError(f"job {job.job_id} has no array task {task}")
        return [(task, job.tasks[task])]

    @staticmethod
    def _rows(job: FakeJob) -> list[tuple[str, FakeTask]]:
        """Printed job ids: ID for a plain job; ID_N per started task, pending tasks as one ID_[a-b%T] row."""
        if None in job.tasks:
            return [(str(job.job_id), job.tasks[None])]
        pending = sorted(k for k, t in job.tasks.items() if k is not None and t.state == "PENDING")
        rows = [(f"{job.job_id}_{k}", t) for k, t in sorted(job.tasks.items()) if k is not None and t.state != "PENDING"]
        if pending:
            throttle = f"%{job.throttle}" if job.throttle else ""
            ids = str(pending[0]) if len(pending) == 1 else f"[{_ranges(pending)}{throttle}]"
            rows.insert(0, (f"{job.job_id}_{ids}", job.tasks[pending[0]]))
        return rows
