"""The one process supervisor: start a command in its own process group with its output in a log,
wait for it to be healthy while noticing an early exit, stop it with TERM then KILL, reap it.

Every engine (the sim engines of `engine.local`, the node agent's engines, profiling engines) and the
local backend's jobs run through it. A failure is an `EngineError` that names the log and quotes its
end, since that is where the reason is. The process group matters: vLLM and a job script start
children of their own, and a TERM to the group reaches all of them. With `die_with_parent` (the node
agent's engines) the kernel SIGKILLs the started process when its parent dies, even by `kill -9`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Collection, Iterable, Mapping, Sequence

from scepsy_hpc.errors import EngineError

LOG_TAIL_LINES = 20
LOG_MODE = 0o600    # every log this module opens: its owner's only
KILL_WAIT_S = 5.0   # how long a SIGKILLed group may take to disappear (a process in D state takes longer)
Health = Callable[[], bool]

# Engines are on our network: never route the health probe through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def is_healthy(url: str | None, timeout_s: float = 1.0) -> bool:
    """Whether the server at base URL `url` answers GET /health with 200 (no proxy: engines are on our network)."""
    if not url:
        return False
    try:
        with _OPENER.open(f"{url}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log ('' when it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports free on `host` now (another process may still take one before it is used)."""
    # Hold every socket until all are chosen, so that the kernel cannot hand out one port twice.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now."""
    return free_ports(1, host)[0]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether `port` can be bound on `host` now (the address the engine will bind: a port another program
    holds on every interface, or on this one, is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as engines bind: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # /proc says whether it is a zombie
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _proc_stats() -> Iterable[tuple[int, int, str]]:
    """(pid, process group, state letter) of every process /proc shows."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue   # exited while we looked
        yield int(stat.parent.name), int(fields[2]), fields[0]


def group_members(pgids: Collection[int]) -> dict[int, list[int]]:
    """The live (not zombie) processes of each process group in `pgids`, in one pass over /proc
    (every group empty where there is no /proc)."""
    members: dict[int, list[int]] = {g: [] for g in pgids}
    if (Path("/proc") / "self" / "stat").exists():
        for pid, pgid, state in _proc_stats():
            if pgid in members and state != "Z":
                members[pgid].append(pid)
    return members


def process_environ(pid: int) -> dict[str, str]:
    """The environment process `pid` was started with ({} when it is gone or not ours to read)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (entry.decode(errors="replace").partition("=") for entry in raw.split(b"\0") if entry)
    return {k: v for k, _, v in pairs}


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of process group `pgid` remains.

    A zombie still answers killpg(…, 0); under a PID 1 that never reaps (a container without an init)
    a stopped job's shell would look alive forever, so /proc decides where it exists."""
    try:
        os.waitpid(pgid, os.WNOHANG)   # reap the leader if it is our own child
    except ChildProcessError:
        pass
    if not (Path("/proc") / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return any(g == pgid and state != "Z" for _, g, state in _proc_stats())


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass   # gone already (a PermissionError here is a recycled id: not ours to signal)


def _await_gone(pgids: Sequence[int], poll_s: float, limit_s: float = KILL_WAIT_S) -> None:
    # SIGKILL is delivered when the process next runs: give the members of the groups a moment to die
    deadline = time.monotonic() + limit_s
    while any(group_alive(g) for g in pgids) and time.monotonic() < deadline:
        time.sleep(poll_s)


def stop_group(pgid: int, grace_s: float = 10.0, poll_s: float = 0.1) -> None:
    """TERM process group `pgid`, KILL what is left after `grace_s`; works for groups started by another process."""
    stop_groups([pgid], grace_s, poll_s)


def stop_groups(pgids: Iterable[int], grace_s: float = 10.0, poll_s: float = 0.1) -> None:
    """TERM every process group in `pgids` at once, KILL those left after `grace_s` in all (groups started
    by another process too: nothing is reaped here but our own children)."""
    live = [g for g in pgids if group_alive(g)]
    for g in live:
        _signal_group(g, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while live and time.monotonic() < deadline:
        live = [g for g in live if group_alive(g)]
        if live:
            time.sleep(poll_s)
    for g in live:
        _signal_group(g, signal.SIGKILL)
    _await_gone(live, poll_s)


PR_SET_PDEATHSIG = 1   # <linux/prctl.h>


def _die_with(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn that makes the child die (SIGKILL) when `parent_pid`, its parent, dies; None where the
    kernel cannot do it (not Linux, no prctl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl   # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None

    args = (ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0),
            ctypes.c_ulong(0))

    def preexec() -> None:
        prctl(*args)   # should it fail, the child runs without it: whoever stops the deployment reaps it
        # The parent may have died between fork and prctl: then no death signal ever comes, and we
        # have been re-parented (to init or a subreaper). Die now, as the signal would have made us.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _preexec(die_with: int | None, ignore_signals: Sequence[int]) -> Callable[[], None] | None:
    """The child's preexec_fn: `_die_with(die_with)` (when given), and the signals to ignore."""
    die = _die_with(die_with) if die_with is not None else None
    ignore = tuple(ignore_signals)
    if die is None and not ignore:
        return None

    def preexec() -> None:
        for sig in ignore:
            signal.signal(sig, signal.SIG_IGN)
        if die is not None:
            die()

    return preexec


@dataclass
class Process:
    """A command running in its own process group (its id is the leader's pid), output in `log_path`."""

    what: str                        # how errors name it: "sim engine 'planner' (llama-3.1-8b on h100)"
    log_path: Path
    popen: subprocess.Popen[bytes]
    health: Health | None = None     # None: healthy once started
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        """The leader's pid (also the process group id)."""
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the leader has exited and been reaped."""
        return self.popen.returncode

    def poll(self) -> int | None:
        """The exit code if the leader has exited (reaping it), else None."""
        return self.popen.poll()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the log."""
        return log_tail(self.log_path, lines)

    def failure(self, why: str) -> EngineError:
        """An EngineError saying `why`, naming the log and quoting its end."""
        return EngineError(f"{self.what} {why}; see {self.log_path}:\n{self.log_tail()}")

    def ready(self, timeout_s: float) -> bool:
        """One look: whether it is healthy; EngineError if it exited or `timeout_s` since its start passed."""
        if self.poll() is not None:
            raise self.failure(f"exited with code {self.returncode} while starting")
        if self.health is None or self.health():
            return True
        if time.monotonic() - self.started > timeout_s:
            raise self.failure(f"not healthy after {timeout_s:g} s")
        return False

    def stop(self, grace_s: float = 10.0) -> int | None:
        """TERM the group, KILL it after `grace_s`, reap the leader; its exit code."""
        stop_all([self], grace_s)
        return self.returncode


def start(argv: Sequence[str], log_path: str | Path, *, what: str, health: str | Health | None = None,
          env: Mapping[str, str] | None = None, cwd: str | Path | None = None, append: bool = False,
          missing_hint: str = "", die_with_parent: bool = False, ignore_signals: Sequence[int] = ()) -> Process:
    """Start `argv` in a new process group (stdout and stderr to `log_path`, no stdin).

    `health` is a base URL (healthy once GET /health answers 200) or a predicate. A command that cannot
    be executed is an EngineError naming it (`missing_hint` says how to provide it).

    `die_with_parent`: the kernel SIGKILLs the started process when this process dies, `kill -9` included
    (Linux PR_SET_PDEATHSIG, set between fork and exec; the child checks that its parent is still the
    same right after, so a parent that died in between is noticed too). Only the started process gets
    it, not what it forks (the kernel clears the setting in children), and it survives exec except into
    a setuid program. Two cautions: it fires when the *thread* that called `start` ends, so call it from
    a thread that lives as long as the process (the node agent's main thread); and it uses preexec_fn,
    which may deadlock a process that runs other threads (a lock held by one at the fork), so use it
    only in a single-threaded process, as the node agent is. Where there is no prctl (not Linux) it does
    nothing.

    `ignore_signals`: set to ignored in the child before exec (an ignored signal stays ignored across exec,
    a handled one does not): Slurm sends its walltime warning (`--signal`) to every process of a job step,
    and an engine that does not handle SIGUSR1 would die of it."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    check: Health | None
    if isinstance(health, str):
        url = health
        check = lambda: is_healthy(url, timeout_s=2.0)  # noqa: E731
    else:
        check = health
    try:
        log = open_log(log_path, append)
    except OSError as exc:
        raise EngineError(f"{what}: cannot open its log {log_path} ({exc.strerror or exc})") from None
    with log as out:
        try:
            popen = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(env) if env is not None else None, cwd=str(cwd) if cwd else None,
                                     start_new_session=True,
                                     preexec_fn=_preexec(os.getpid() if die_with_parent else None, ignore_signals))
        except FileNotFoundError:
            host = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
            raise EngineError(f"{what}: `{argv[0]}` is not installed on {host}"
                              + (f": {missing_hint}" if missing_hint else "")) from None
        except OSError as exc:
            raise EngineError(f"{what}: cannot run `{argv[0]}` ({exc.strerror or exc})"
                              + (f"; {missing_hint}" if missing_hint else "")) from None
    return Process(what, log_path, popen, check)


def open_log(path: Path, append: bool = False) -> BinaryIO:
    """A log file opened for writing, readable by its owner only (0600, whatever the umask; an older log of
    ours that was wider is narrowed): what an engine logs may quote prompts or secrets."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC) | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, LOG_MODE)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, LOG_MODE)
    except OSError:   # not ours to change (a shared log someone else made): leave it
        pass
    return os.fdopen(fd, "ab" if append else "wb")


def wait_healthy(procs: Iterable[Process], timeout_s: float, poll_s: float = 0.05) -> None:
    """Until every process is healthy; EngineError (with its log's end) when one exits or `timeout_s` passes."""
    pending = list(procs)
    while pending:
        pending = [p for p in pending if not p.ready(timeout_s)]
        if pending:
            time.sleep(poll_s)


def stop_all(procs: Iterable[Process], grace_s: float = 10.0, poll_s: float = 0.05) -> None:
    """TERM every process group at once, KILL those left after `grace_s` in all, reap every leader."""
    live = [p for p in procs if p.poll() is None or group_alive(p.pid)]
    for p in live:
        _signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while live and time.monotonic() < deadline:
        live = [p for p in live if p.poll() is None or group_alive(p.pid)]
        if live:
            time.sleep(poll_s)
    for p in live:
        _signal_group(p.pid, signal.SIGKILL)
    for p in live:
        p.popen.wait()
    _await_gone([p.pid for p in live], poll_s)
