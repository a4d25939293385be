"""The node agent: runs once per node inside the serving job and starts that node's engines.

    python -m scepsy_hpc.backend.agent --session DIR [--node NAME]
    job_main(DIR)      the same, as the function a submitit job runs once per node

It reads `DIR/serve.json` (written by `scepsy up`), takes the instances placed on its node
(`--node`, else $SLURMD_NODENAME, else the host name), maps their planned GPU indices onto the GPUs the
job holds there, and starts each engine with its CUDA_VISIBLE_DEVICES. Engines sharing a GPU start one
after another, each once the previous one answers /health (two engines loading at once would both see
the whole GPU free); engines on different GPUs start together. With fractions and a real engine, an
MPS control daemon runs for the node and each engine gets its thread percentage. Progress goes to
`DIR/agents/NODE.json` (state starting → ready, or failed with the engine's log), rewritten at least
every HEARTBEAT_S even when nothing changed, so that a reader on another node can tell a live agent from
a dead one by its `updated` time (`report_stale`). On SIGTERM (scancel, `scepsy down`) the engines are
stopped and the agent exits. SIGUSR1 (Slurm's walltime warning) and submitit's preemption signal set the
report's `draining_since`, written at once: the job ends soon, so whoever routes stops sending new calls
here, while the engines serve on (in-flight calls finish) until SIGTERM.

While serving, an engine that exits is restarted on its port after a backoff, at most `max_restarts`
times within `restart_window_s` (serve.json), then left failed while the others serve on. So is an engine
that is wedged — alive, /health answering 200, yet making no progress, as a vLLM can be: every
`progress_check_s` the agent reads each serving engine's /metrics (`engine.metrics.scrape_load`, at most
SCRAPE_TIMEOUT_S; a page it cannot read proves nothing), and when requests wait or run while the token
counters have not moved for `stall_timeout_s`, it kills the engine's process group and restarts it the
same way. An idle engine's counters stand still by right and never count as a stall. Each engine's report
says why and when it was last restarted (`last_restart_reason`, `last_restart_at`).

Engines die with their agent: each is started with PR_SET_PDEATHSIG, so even `kill -9` of the agent
takes them down. An engine is the leader of its own process group (its reported `pid` is also the
group's id) and carries SCEPSY_ENGINE_ID in its environment, which lets `reap_engines` stop on this
host whatever of a deployment is left — what an engine forked outlives the death signal — while
refusing a process that merely got a recycled pid.

Exposure: each engine binds the node's cluster address (`bind_address`: loopback on the local backend,
whose job script sets SCEPSY_BIND_HOST), not every interface, and gets the job's engine secret
(serve.json's `engine_secret`) by environment where the engine reads one (`engine.adapters.secret_env`),
so that only the gateway, which adds it, can call it; /health and /metrics, which the agent probes, stay
open. Ports are picked under a lock of this user's own (`port_lock_path`), never a file in a shared
directory that another user could hold; another user's ports are still avoided, since a port is only
taken if it can be bound.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import ipaddress
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from pydantic import ConfigDict, Field

from scepsy_hpc.backend.records import RERUN, AgentReport, InstanceReport, ServeConfig
from scepsy_hpc.engine.adapters import (SECRET_ENV, EngineLaunch, base_url, engine_argv, engine_command, engine_env,
                                        parse_prefix, secret_env)
from scepsy_hpc.engine.metrics import EngineLoad, scrape_load
from scepsy_hpc.engine.supervisor import (Process, free_port, group_members, is_healthy, port_free, process_environ,
                                          start, stop_all, stop_groups)
from scepsy_hpc.errors import EngineError, run_entry
from scepsy_hpc.spec.records import read_record, write_record

PORT_LOCK_NAME = "scepsy-agent-ports.lock"   # in a directory of this user's own: `port_lock_path`
BIND_ENV = "SCEPSY_BIND_HOST"                # the address engines bind (a site's separate cluster network;
                                             # the local backend's job sets 127.0.0.1); default `bind_address`
RESTART_BACKOFF_MAX_S = 30.0                 # the longest wait before restarting an engine that exited
HEARTBEAT_S = 5.0                            # the report is rewritten at least this often
HEARTBEAT_ENV = "SCEPSY_AGENT_HEARTBEAT_S"   # overrides HEARTBEAT_S (tests)
STALE_AFTER_S = 3 * HEARTBEAT_S              # a live agent's report is never older than this
ENGINE_ID_ENV = "SCEPSY_ENGINE_ID"           # in every engine's environment: which engine of which agent it is
SCRAPE_TIMEOUT_S = 2.0                       # the longest one read of an engine's /metrics holds the agent up
WEDGED_STOP_GRACE_S = 2.0                    # a wedged engine may not act on SIGTERM: SIGKILL after this


@dataclasses.dataclass(frozen=True)
class Progress:
    """The watchdog's memory of one engine: its token count, and when the count last moved (or the engine
    was last seen idle: a wait for work is not a stall)."""

    tokens: float
    moved_at: float   # time.monotonic()


def progress(prev: Progress | None, load: EngineLoad, now: float) -> Progress:
    """The memory after one look at the engine's load at `now`."""
    if prev is None or load.tokens != prev.tokens or not load.busy:
        return Progress(load.tokens, now)
    return prev


def wedged_reason(prev: Progress | None, load: EngineLoad | None, now: float,
                  stall_timeout_s: float) -> tuple[Progress | None, str]:
    """One look of the watchdog: the new memory, and why the engine is wedged ('' when it is not).

    An unreadable /metrics (`load` None) proves nothing and leaves the memory as it was; `stall_timeout_s`
    0 judges nothing."""
    if load is None:
        return prev, ""
    now_p = progress(prev, load, now)
    stalled_s = now - now_p.moved_at
    if stall_timeout_s <= 0 or not load.busy or stalled_s < stall_timeout_s:
        return now_p, ""
    return now_p, (f"wedged: {load.waiting} request(s) waiting and {load.running} running, "
                   f"no token for {stalled_s:.0f} s")


def engine_id(agent_pid: int, node: str, inst: InstanceReport) -> str:
    """The value of SCEPSY_ENGINE_ID for engine `inst` started by agent `agent_pid` on `node`: everything
    in it is in the agent's report, and its start time makes it unique to this one start."""
    return f"{node}/{agent_pid}/{inst.llm}/{inst.replica}/{inst.started_at:.6f}"


def _bindable(addr: str) -> bool:
    """Whether this host has address `addr` (a socket can be bound to it)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((addr, 0))
    except OSError:
        return False
    return True


def bind_address(node: str, env: Mapping[str, str], resolve: Callable[..., Any] = socket.getaddrinfo,
                 bindable: Callable[[str], bool] = _bindable) -> str:
    """The address this node's engines bind and are called at: $SCEPSY_BIND_HOST if set, else the first
    address of this host that the node's Slurm name resolves to, else the host name's, preferring one that
    is not loopback (Debian maps the host name to 127.0.1.1 in /etc/hosts; a local Slurm's node names may
    resolve to nothing at all), else 127.0.0.1. Never every interface."""
    if env.get(BIND_ENV):
        return env[BIND_ENV]
    found: list[str] = []
    for name in dict.fromkeys((node, socket.gethostname())):
        try:
            infos = resolve(name, None, socket.AF_INET, socket.SOCK_STREAM)
        except (OSError, UnicodeError):   # socket.gaierror is an OSError
            continue
        found += [a for a in dict.fromkeys(str(i[4][0]) for i in infos) if a not in found and bindable(a)]
    routable = [a for a in found if not ipaddress.ip_address(a).is_loopback]
    return (routable or found or ["127.0.0.1"])[0]


def _private_dir(path: Path) -> bool:
    """Whether `path` is a directory (not a symlink) that this user owns and nobody else can enter."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def port_lock_path(env: Mapping[str, str], session: Path, tmp: str | Path | None = None) -> Path:
    """The lock that serialises port picking between this user's agents on this node, in a directory that is
    this user's alone: $XDG_RUNTIME_DIR if it is one here, else <tmp>/scepsy-<uid> (made 0700; refused if
    someone else made it, or made it a symlink, first), else the job's session directory. Another user
    cannot open it, so cannot stall our engines by holding it (a shared /tmp file could be)."""
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and _private_dir(Path(runtime)):
        return Path(runtime) / PORT_LOCK_NAME
    own = Path(tmp if tmp is not None else tempfile.gettempdir()) / f"scepsy-{os.getuid()}"
    try:
        own.mkdir(mode=0o700)
    except OSError:
        pass   # there already (ours from an earlier agent, or a squatter's: checked next), or /tmp is read-only
    if _private_dir(own):
        return own / PORT_LOCK_NAME
    return session / PORT_LOCK_NAME


@contextlib.contextmanager
def port_lock(path: Path) -> Iterator[None]:
    """Hold the exclusive lock `path` (made 0600, never through a symlink); EngineError if it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise EngineError(f"cannot open the port lock {path} ({exc.strerror or exc}); set XDG_RUNTIME_DIR or "
                          f"TMPDIR to a directory of yours on this node") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # releases the lock


def shell_line(launch: EngineLaunch, prefix: str, which: Callable[[str], str | None] = shutil.which,
               secret: str | None = None) -> str:
    """The `bash -c` line that runs the engine after a launch prefix, with `exec` where that is unambiguous
    so that the shell becomes the engine: the reported pid is then the engine's, and so is the process
    the agent's death signal reaches (the kernel does not pass it on to children).

    A prefix ending in `&&` or `;` (`module load vllm &&`) gets `exec` before the engine; a lone command
    that is a program on PATH (`apptainer exec --nv img.sif`) gets `exec` before the prefix. Anything
    else (`module load x && apptainer exec img`, an assignment, a shell function) is left as it is:
    bash 5.1 and later exec the last command of such a line by themselves; an older bash keeps the
    engine as its child, and `reap_engines` finds it by its SCEPSY_ENGINE_ID."""
    line = engine_command(launch, secret=secret)
    prefix = parse_prefix(prefix)
    if not prefix:
        return line
    try:
        lexer = shlex.shlex(prefix, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:   # unbalanced quotes: bash will say what is wrong
        return f"{prefix} {line}"
    operators = [w for w in words if set(w) <= set("();<>|&")]
    if words and words[-1] in ("&&", ";"):
        return f"{prefix} exec {line}"
    if words and not operators and "=" not in words[0] and which(words[0]):
        return f"exec {prefix} {line}"
    return f"{prefix} {line}"


class Instance(InstanceReport):
    """One engine of this node: what the plan says and what became of it — its report, which the agent
    updates in place — plus how to start it and the running process (neither is reported). Its `pid`,
    written as soon as it is spawned, is also its process group's id."""

    model_config = ConfigDict(frozen=False, extra="forbid", arbitrary_types_allowed=True)

    launch: EngineLaunch = Field(exclude=True)
    proc: Process | None = Field(default=None, exclude=True, repr=False)
    exits: list[float] = Field(default_factory=list, exclude=True)   # monotonic times it exited while serving
    restart_at: float | None = Field(default=None, exclude=True)     # when the next restart is due
    exit_reason: str = Field(default="", exclude=True)                # why it is to be restarted
    progress: Progress | None = Field(default=None, exclude=True)    # the watchdog's memory (None: no look yet)
    check_at: float = Field(default=0.0, exclude=True)               # monotonic time of the watchdog's next look

    def report(self) -> InstanceReport:
        """What the agent's report says of this engine."""
        return InstanceReport.model_validate(self.model_dump())


def map_gpus(planned: Sequence[int], env: dict[str, str]) -> tuple[dict[int, tuple[int, str]], bool]:
    """Planned GPU index → (physical index, what CUDA_VISIBLE_DEVICES names it), and whether we remapped.

    Inside a Slurm step, SLURM_STEP_GPUS/SLURM_JOB_GPUS list the physical GPUs the job holds and
    CUDA_VISIBLE_DEVICES the same GPUs as this process must name them (renumbered from 0 when Slurm
    constrains devices). A planned index the job holds is used as it is; if Slurm gave other GPUs
    (the plan's were taken meanwhile), the planned ones map in order onto those held."""
    phys_text = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS") or ""
    vis_text = env.get("CUDA_VISIBLE_DEVICES", "")
    physical = [int(x) for x in phys_text.split(",") if x.strip().isdigit()]
    visible = [x.strip() for x in vis_text.split(",") if x.strip()]
    wanted = sorted(set(planned))
    if not physical:   # not under Slurm (the local backend): the plan's indices as they are
        return {g: (g, str(g)) for g in wanted}, False
    if len(visible) != len(physical):
        visible = [str(p) for p in physical]
    if set(wanted) <= set(physical):
        return {g: (g, visible[physical.index(g)]) for g in wanted}, False
    if len(wanted) > len(physical):
        raise RuntimeError(f"the job holds GPUs {phys_text} on this node; the placement needs {len(wanted)}: {wanted}")
    return {g: (physical[i], visible[i]) for i, g in enumerate(wanted)}, True


def colocation_chains(instances: Sequence[Instance]) -> list[list[Instance]]:
    """Groups of instances linked by sharing a GPU, each in start order (largest share first)."""
    groups: list[tuple[set[int], list[Instance]]] = []
    for inst in instances:
        linked = [g for g in groups if g[0] & set(inst.gpus)]
        gpus, members = set(inst.gpus), [inst]
        for g in linked:
            gpus |= g[0]
            members += g[1]
            groups.remove(g)
        groups.append((gpus, members))
    return [sorted(m, key=lambda i: (-i.gpu_frac, i.llm, i.replica)) for _, m in groups]


class Agent:
    """Starts, watches and stops the engines of one node."""

    def __init__(self, session: Path, node: str, config: ServeConfig, env: dict[str, str]) -> None:
        self.session, self.node, self.config, self.env = session, node, config, env
        self.host = socket.gethostname()                       # the report's: the host the agent runs on
        self.bind = bind_address(node, env)                    # what its engines bind, and their URLs
        self.port_lock = port_lock_path(env, session)
        self.report_path = session / "agents" / f"{node}.json"
        self.log_dir = session / "logs"
        self.state = "starting"
        self.error = ""
        self.stop_requested = False
        self.draining_since: float | None = None   # Unix time the walltime/preemption warning came
        self.writing = False                       # inside write(): a signal handler must not write too
        self.reported_draining = False             # the last report written says draining_since
        self.mps_env: dict[str, str] = {}
        # the signals Slurm sends every process of the job before it ends it: the engines ignore them (they would
        # die of SIGUSR1), the agent drains on them (`_run_agent` sets them)
        self.warnings: tuple[int, ...] = (signal.SIGUSR1,)
        self.heartbeat_s = float(env.get(HEARTBEAT_ENV) or HEARTBEAT_S)
        self.written = 0.0   # time.monotonic() of the last write
        self.instances = [Instance(llm=i.llm, replica=i.replica, gpus=list(i.gpus), gpu_frac=i.gpu_frac, mps_pct=i.mps_pct,
                                   launch=i.launch, port=i.port)
                          for i in config.instances if i.node == node]

    def write(self) -> None:
        """The report, replaced atomically."""
        self.writing = True
        try:
            report = AgentReport(
                node=self.node, host=self.host, pid=os.getpid(), state=self.state, error=self.error,
                job_id=self.env.get("SLURM_JOB_ID", ""), updated=time.time(), draining_since=self.draining_since,
                instances=[i.report() for i in self.instances])
            write_record(self.report_path, report)
            self.reported_draining = report.draining_since is not None
            self.written = time.monotonic()
        finally:
            self.writing = False

    def beat(self) -> None:
        """Rewrite the report if the last write is `heartbeat_s` old (its `updated` says the agent lives), or
        if it does not say yet that the agent is draining."""
        if time.monotonic() - self.written >= self.heartbeat_s or (
                self.draining_since is not None and not self.reported_draining):
            self.write()

    def drain(self) -> None:
        """The walltime or preemption warning came (a signal handler calls this): the report says so at once,
        unless a write is under way — then the next beat does; the engines keep serving."""
        if self.draining_since is None:
            self.draining_since = time.time()
        if not self.writing:
            self.write()

    def fail(self, inst: Instance | None, why: str) -> None:
        """Record a failure (naming the engine's log) and stop everything."""
        self.state = "failed"
        self.error = why
        if inst is not None:
            inst.state, inst.error, inst.healthy = "failed", why, False
        self.write()
        self.stop_all()

    def run(self) -> int:
        """Start the node's engines, then watch them until told to stop."""
        try:
            mapping, remapped = map_gpus([g for i in self.instances for g in i.gpus], self.env)
        except RuntimeError as exc:
            self.fail(None, str(exc))
            return 1
        for inst in self.instances:
            inst.remapped = remapped
            inst.cuda_visible_devices = ",".join(mapping[g][1] for g in inst.gpus)
            inst.gpus = [mapping[g][0] for g in inst.gpus]
        self.write()
        if not self.start_mps():
            return 1
        chains = colocation_chains(self.instances)
        timeout_s = self.config.health_timeout_s
        while not self.stop_requested:
            pending = False
            for chain in chains:
                current = next((i for i in chain if i.state != "healthy"), None)
                if current is None:
                    continue
                pending = True
                if current.state == "waiting":
                    self.start(current)
                    self.write()
                    if self.state == "failed":
                        return 1
                    continue
                assert current.proc is not None   # started above
                try:
                    ready = current.proc.ready(timeout_s)
                except EngineError as exc:
                    self.fail(current, str(exc))
                    return 1
                if ready:
                    self._healthy(current)
                    self.write()
                self.beat()   # after each probe: one that hangs takes seconds, and there may be many
            if not pending:
                break
            time.sleep(0.2)
        if self.stop_requested:
            self.stop_all()
            return 0
        self.state = "ready"
        self.write()
        while not self.stop_requested:   # watch: an engine that dies is restarted, the others keep serving
            changed = False
            for inst in self.instances:
                if self.stop_requested:
                    break
                changed = self.watch(inst) or changed
                if self.state == "failed":
                    return 1
                self.beat()   # after each look: reading /metrics may take up to SCRAPE_TIMEOUT_S
            if changed:
                self.write()
            self.beat()
            time.sleep(min(0.5, self.heartbeat_s))
        self.stop_all()
        return 0

    def _healthy(self, inst: Instance) -> None:
        """`inst` answered /health: it serves, and the watchdog starts afresh."""
        inst.state, inst.healthy, inst.healthy_at, inst.error = "healthy", True, time.time(), ""
        inst.progress, inst.check_at = None, time.monotonic() + self.config.progress_check_s

    def watch(self, inst: Instance) -> bool:
        """One look at a serving engine: an exit, or a wedge (`check_progress`), is restarted after a backoff
        (1 s, doubling up to RESTART_BACKOFF_MAX_S), unless it went down more than `max_restarts` times in
        `restart_window_s`, when it is left failed; a restart is healthy once it answers /health. Whether the
        report changed."""
        if inst.proc is None or inst.state in ("failed", "stopped"):
            return False
        now = time.monotonic()
        if inst.state == "exited":
            if inst.restart_at is not None and now >= inst.restart_at:
                inst.restart_at = None
                inst.restarts += 1
                inst.last_restart_reason, inst.last_restart_at = inst.exit_reason, time.time()
                self.start(inst)
                return True
            return False
        if inst.state == "starting":   # a restart coming up
            try:
                if not inst.proc.ready(self.config.health_timeout_s):
                    return False
            except EngineError as exc:
                return self._exited(inst, now, str(exc).splitlines()[0], str(exc))
            self._healthy(inst)
            return True
        if inst.proc.poll() is not None:
            reason = f"exited with code {inst.proc.returncode}"
            return self._exited(inst, now, reason, f"{reason}; see {inst.log}")
        if now >= inst.check_at:
            inst.check_at = now + self.config.progress_check_s
            reason = self.check_progress(inst, now)
            if reason:
                inst.proc.stop(WEDGED_STOP_GRACE_S)
                return self._exited(inst, time.monotonic(), reason, f"{reason}; see {inst.log}")
        return False

    def check_progress(self, inst: Instance, now: float) -> str:
        """The watchdog's look at a serving engine's /metrics: why it is wedged, '' if it is not (or its
        metrics cannot be read: that proves nothing)."""
        inst.progress, reason = wedged_reason(inst.progress, scrape_load(inst.url, SCRAPE_TIMEOUT_S), now,
                                              self.config.stall_timeout_s)
        if not reason:
            return ""
        health = "although /health answered 200" if is_healthy(inst.url, 1.0) else "and /health does not answer"
        return f"{reason} {health}"

    def _exited(self, inst: Instance, now: float, reason: str, why: str) -> bool:
        """`inst` went down at `now` for `reason` (`why` says it at length, naming the log): restart it later,
        or leave it failed when it went down too often."""
        window = self.config.restart_window_s
        inst.exits = [t for t in inst.exits if now - t < window] + [now]
        inst.healthy, inst.exit_reason = False, reason
        if len(inst.exits) > self.config.max_restarts:
            inst.state = "failed"
            inst.error = (f"{why}; it went down {len(inst.exits)} times within {window:g} s, more than the "
                          f"{self.config.max_restarts} restarts allowed: not restarted again")
            return True
        delay = min(RESTART_BACKOFF_MAX_S, 2.0 ** (len(inst.exits) - 1))
        inst.state, inst.error, inst.restart_at = "exited", f"{why}; restarting in {delay:g} s", now + delay
        return True

    def start(self, inst: Instance) -> None:
        """Spawn one engine on its GPUs and port (ports chosen under this user's lock: agents may share a host),
        bound to the node's address, with the job's secret."""
        log = self.log_dir / f"engine-{inst.llm}-{inst.replica}.log"
        inst.log = str(log)
        # the engine's secret is the job's, whatever this process inherited
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV.values()}
        env.update(self.mps_env)
        secret, bind = self.config.engine_secret, self.bind
        what = f"engine {inst.llm}·{inst.replica} on {self.node} GPUs {inst.cuda_visible_devices}"
        try:
            with port_lock(self.port_lock):
                port = inst.port if inst.port and port_free(inst.port, bind) else free_port(bind)
                launch = dataclasses.replace(inst.launch, port=port, host=bind)
                env.update(engine_env(launch, inst.cuda_visible_devices.split(","), inst.mps_pct))
                env.update(secret_env(launch, secret))
                prefix = self.config.launch_prefix
                argv = (["bash", "-c", shell_line(launch, prefix, secret=secret)] if prefix
                        else engine_argv(launch, secret=secret))
                url = base_url(launch, bind)
                inst.started_at = time.time()
                env[ENGINE_ID_ENV] = engine_id(os.getpid(), self.node, inst)
                inst.proc = start(argv, log, what=what, health=url, env=env, append=True, die_with_parent=True,
                                  ignore_signals=self.warnings)
                inst.port, inst.pid, inst.state, inst.url = port, inst.proc.pid, "starting", url
                deadline = time.monotonic() + 5.0   # hold the lock until the engine holds its port
                while port_free(port, bind) and inst.proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
        except EngineError as exc:   # the lock cannot be opened, or the engine not run
            self.fail(inst, str(exc))

    def start_mps(self) -> bool:
        """An MPS control daemon when this node shares GPUs between real engines."""
        if self.config.engine == "sim" or all(i.gpu_frac >= 1 for i in self.instances):
            return True
        base = self.session / "mps" / self.node
        self.mps_env = {"CUDA_MPS_PIPE_DIRECTORY": str(base / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(base / "log")}
        for d in self.mps_env.values():
            Path(d).mkdir(parents=True, exist_ok=True, mode=0o700)
        gpus = sorted({g for i in self.instances for g in i.cuda_visible_devices.split(",")})
        try:
            subprocess.run(["nvidia-cuda-mps-control", "-d"], env={**os.environ, **self.mps_env,
                           "CUDA_VISIBLE_DEVICES": ",".join(gpus)}, check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            self.fail(None, f"GPU fractions on {self.node} need NVIDIA MPS, but `nvidia-cuda-mps-control -d` failed: {exc}")
            return False
        return True

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM every engine's process group, SIGKILL what is left after `grace_s`; stop MPS."""
        stop_all([i.proc for i in self.instances if i.proc is not None], grace_s)
        for inst in self.instances:
            if inst.state in ("healthy", "starting"):
                inst.state, inst.healthy = "stopped", False
        if self.mps_env:
            subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env={**os.environ, **self.mps_env},
                           capture_output=True, timeout=30, check=False)
            self.mps_env = {}
        if self.state != "failed":
            self.state = "stopped"
        self.write()


def report_stale(report: AgentReport, now: float | None = None) -> bool:
    """Whether a report that says its agent is still at work (starting, ready) is too old for a live agent:
    then the agent is gone (killed, its node lost) and what it says of its engines is no longer true."""
    age_s = (time.time() if now is None else now) - report.updated
    return report.state in ("starting", "ready") and age_s > STALE_AFTER_S


def reap_engines(reports: Iterable[AgentReport], grace_s: float = 10.0) -> list[int]:
    """Stop on this host every engine of `reports` whose process group still runs; the groups stopped.

    For whoever stops a deployment on the host its agents ran on (the local backend, the daemon): an
    agent that died by `kill -9` took its engines down with it, but not what they forked (vLLM's
    workers), and an engine started where prctl is missing stays up. A reported pid is a process group
    id; the group is only stopped if one of its live members has the engine's own SCEPSY_ENGINE_ID in
    its environment (agent pid, node, engine and spawn time to the microsecond, all from the report).
    A recycled pid — an unrelated process, or a new group led by a process that got the old id —
    cannot carry it, and a member that outlived its leader still does, which a start-time comparison
    of the leader could not tell. Processes of other users cannot be read, so they are never ours.
    Without /proc (not Linux) nothing can be checked and nothing is stopped. TERM goes to every group
    at once, KILL to those left after `grace_s`."""
    wanted = {inst.pid: engine_id(report.pid, report.node, inst)
              for report in reports for inst in report.instances if inst.pid}
    members = group_members(wanted)
    ours = [pgid for pgid, marker in wanted.items()
            if any(process_environ(pid).get(ENGINE_ID_ENV) == marker for pid in members[pgid])]
    stop_groups(ours, grace_s)
    return ours


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point inside the job."""
    ap = argparse.ArgumentParser(prog="python -m scepsy_hpc.backend.agent", description=__doc__.splitlines()[0])
    ap.add_argument("--session", required=True, type=Path, help="the session directory of `scepsy up`")
    ap.add_argument("--node", help="this node's name (default: $SLURMD_NODENAME, else the host name)")
    args = ap.parse_args(argv)
    node = args.node or os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    return run_entry(lambda: _run_agent(args.session, node), prog=f"agent on {node}")


def job_main(session: str) -> int:
    """The function a submitit job runs once per node (tasks_per_node=1): this node's agent; its exit status.

    Submitit has installed its own handlers by the time it calls us — SIGTERM only logged, its preemption
    signal (SIGUSR2 unless $SUBMITIT_PREEMPT_SIGNAL) checkpointing or requeueing the job — and ours
    replace them: SIGTERM stops the engines, and the preemption signal starts draining like SIGUSR1 (a
    serving job has nothing to checkpoint; Slurm's SIGTERM follows)."""
    warnings = [signal.SIGUSR1]
    try:
        import submitit

        job = submitit.JobEnvironment()
        node = job.hostnames[job.node]
        name = job.USR_SIG if job.USR_SIG.startswith("SIG") else f"SIG{job.USR_SIG}"
        warnings += [getattr(signal, name)] if hasattr(signal, name) else []
    except Exception:   # not installed, not a submitit job, a node list it cannot parse: as main() does
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    return run_entry(lambda: _run_agent(Path(session), node, warnings), prog=f"agent on {node}")


def _run_agent(session: Path, node: str, warnings: Sequence[int] = (signal.SIGUSR1,)) -> int:
    """Read serve.json, start this node's engines and keep them until told to stop; the exit status.

    SIGTERM and SIGINT stop it; each of `warnings` (the walltime warning, the preemption signal) is logged
    and sets the report's `draining_since` at once; the engines keep serving."""
    config = read_record(session / "serve.json", ServeConfig, RERUN)
    agent = Agent(session, node, config, dict(os.environ))
    agent.warnings = tuple(warnings)

    def stop(signum: int, _frame: Any) -> None:
        agent.stop_requested = True

    def warned(signum: int, _frame: Any) -> None:
        # os.write, not print: a handler that prints while the main code prints breaks the buffered stdout
        name = signal.Signals(signum).name
        os.write(1, f"agent on {node}: got {name}; draining: the engines keep serving until SIGTERM\n".encode())
        agent.drain()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for sig in warnings:
        signal.signal(sig, warned)
    print(f"agent on {node}: {len(agent.instances)} engine(s); report {agent.report_path}", flush=True)
    rc = agent.run()
    print(f"agent on {node}: {agent.state}" + (f": {agent.error}" if agent.error else ""), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
