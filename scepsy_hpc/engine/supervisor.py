"""The one process supervisor: start a command in its own process group with its output in a log,
wait for it to be healthy while noticing an early exit, stop it with TERM then KILL, reap it.

Every engine (the sim engines of `engine.local`, the node agent's engines, profiling engines) and the
local backend's jobs run through it. A failure is an `EngineError` that names the log and quotes its
end, since that is where the reason is. The process group matters: vLLM and a job script start
children of their own, and a TERM to the group reaches all of them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from scepsy_hpc.errors import EngineError

LOG_TAIL_LINES = 20
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


def port_free(port: int, host: str = "0.0.0.0") -> bool:
    """Whether `port` can be bound on `host` now."""
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


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of process group `pgid` remains.

    A zombie still answers killpg(…, 0); under a PID 1 that never reaps (a container without an init)
    a stopped job's shell would look alive forever, so /proc decides where it exists."""
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
    if not group_alive(pgid):
        return
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return
        time.sleep(poll_s)
    _signal_group(pgid, signal.SIGKILL)
    _await_gone([pgid], poll_s)


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
          missing_hint: str = "") -> Process:
    """Start `argv` in a new process group (stdout and stderr to `log_path`, no stdin).

    `health` is a base URL (healthy once GET /health answers 200) or a predicate. A command that cannot
    be executed is an EngineError naming it (`missing_hint` says how to provide it)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    check: Health | None
    if isinstance(health, str):
        url = health
        check = lambda: is_healthy(url, timeout_s=2.0)  # noqa: E731
    else:
        check = health
    with open(log_path, "ab" if append else "wb") as out:
        try:
            popen = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(env) if env is not None else None, cwd=str(cwd) if cwd else None,
                                     start_new_session=True)
        except FileNotFoundError:
            host = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
            raise EngineError(f"{what}: `{argv[0]}` is not installed on {host}"
                              + (f": {missing_hint}" if missing_hint else "")) from None
        except OSError as exc:
            raise EngineError(f"{what}: cannot run `{argv[0]}` ({exc.strerror or exc})"
                              + (f"; {missing_hint}" if missing_hint else "")) from None
    return Process(what, log_path, popen, check)


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
