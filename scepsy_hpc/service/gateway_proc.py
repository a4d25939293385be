"""The gateway as its own process: started by the daemon, adopted by the next daemon, restarted on its port.

The daemon keeps the gateway's port, pid and process start time in the state (`meta`). The gateway
runs in its own session, so killing the daemon (even with SIGKILL) leaves it serving with the routes
it has; a new daemon adopts it when the pid still names the same process (same start time, our
command line) and it answers /health. Otherwise a new gateway is started on the same port.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from scepsy_hpc.engine.supervisor import Process, free_port, is_healthy, port_free, start, stop_group
from scepsy_hpc.errors import ScepsyError

log = logging.getLogger("scepsy_hpc.service")


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_cmdline(pid: int) -> list[str]:
    """The process's argv ([] when it is gone or unreadable)."""
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


class GatewayProcess:
    """The one gateway of a state dir."""

    def __init__(self, gateway_dir: Path, store: Any, host: str, port: int | None, trace: bool) -> None:
        self.dir = gateway_dir
        self.store = store
        self.host = host
        self.wanted_port = port
        self.trace = trace
        self.proc: Process | None = None    # when this daemon started it (its child: reaped here)
        self.pid: int | None = None
        self.port: int | None = None
        self.restarts = 0

    @property
    def endpoints(self) -> Path:
        """The endpoints file the gateway follows."""
        return self.dir / "endpoints.yaml"

    @property
    def url(self) -> str | None:
        """The gateway's base URL (without /v1)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}" if self.port else None

    def trace_path(self) -> Path:
        """A new trace file's path: traces/gateway-<UTC time>-<daemon pid>.jsonl (kept in the state as the
        current one: `current_trace`)."""
        import datetime as dt
        import os

        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        path = self.dir / "traces" / f"gateway-{stamp}-{os.getpid()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store.set_meta("gateway_trace", str(path))
        return path

    def current_trace(self) -> Path | None:
        """The trace the running gateway writes (None without --trace)."""
        text = self.store.get_meta("gateway_trace")
        return Path(text) if text else None

    def _ours(self, pid: int, started: int | None) -> bool:
        argv = process_cmdline(pid)
        return (started is not None and process_start(pid) == started and "scepsy_hpc.gateway" in argv
                and str(self.endpoints) in argv)

    def adopt(self) -> bool:
        """Take over the gateway the state names, if that process is still ours and healthy."""
        pid = self.store.get_meta("gateway_pid")
        port = self.store.get_meta("gateway_port")
        started = self.store.get_meta("gateway_start")
        if not (pid and port and pid.isdigit() and port.isdigit()):
            return False
        if not self._ours(int(pid), int(started) if started and started.isdigit() else None):
            return False
        self.pid, self.port = int(pid), int(port)
        if not is_healthy(self.url, timeout_s=2.0):
            return False
        return True

    def alive(self) -> bool:
        """Whether the gateway process runs (reaping it when it is our child)."""
        if self.proc is not None:
            return self.proc.poll() is None
        if self.pid is None:
            return False
        started = self.store.get_meta("gateway_start")
        return self._ours(self.pid, int(started) if started and started.isdigit() else None)

    def start(self) -> None:
        """Start a gateway on the state's port (a new free one the first time, or when another program took it)."""
        stored = self.store.get_meta("gateway_port")
        port = self.wanted_port or (int(stored) if stored and stored.isdigit() else None)
        if port is None or not port_free(port, self.host):
            if port is not None and self.wanted_port:
                raise ScepsyError(f"gateway port {port} on {self.host} is taken by another program; pick another with "
                                  f"`scepsy daemon start --gateway-port P`")
            if port is not None:
                log.warning("gateway port %s is taken by another program: moving to a new port", port)
            port = free_port(self.host)
        argv = [sys.executable, "-m", "scepsy_hpc.gateway", "--endpoints", str(self.endpoints), "--host", self.host,
                "--port", str(port)]
        if self.trace:
            # one trace per gateway start: a restarted gateway numbers calls afresh, so it never appends to an old one
            argv += ["--trace", str(self.trace_path())]
        log_path = self.dir / "gateway.log"
        if log_path.exists():
            log_path.chmod(0o600)   # a log an older scepsy left readable by others
        if not self.trace:
            self.store.set_meta("gateway_trace", "")
        self.proc = start(argv, log_path, what="gateway", health=f"http://127.0.0.1:{port}"
                          if self.host in ("0.0.0.0", "") else f"http://{self.host}:{port}", append=True)
        deadline = time.monotonic() + 30.0
        while True:
            try:
                if self.proc.ready(30.0):
                    break
            except ScepsyError:
                self.proc = None
                raise
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.pid, self.port = self.proc.pid, port
        self.store.set_meta("gateway_pid", str(self.pid))
        self.store.set_meta("gateway_port", str(port))
        self.store.set_meta("gateway_start", str(process_start(self.pid) or ""))

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the gateway (only when every deployment is down and the daemon is told to stop everything)."""
        if self.pid is not None and self.alive():
            stop_group(self.pid, grace_s)
        if self.proc is not None:
            self.proc.poll()
        self.proc, self.pid = None, None
        self.store.set_meta("gateway_pid", "")
