"""Starting and stopping the daemon from the CLI: detached in its own session, logging to the state dir.

`start_daemon` returns once the new daemon answers on its socket, or raises with the end of its log
(a second daemon, for instance, exits at once saying which pid holds the lock).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from scepsy_hpc.engine.supervisor import log_tail, pid_alive
from scepsy_hpc.errors import ScepsyError
from scepsy_hpc.service.client import DaemonClient, DaemonNotRunning
from scepsy_hpc.service.paths import StatePaths

START_TIMEOUT_S = 60.0


def start_daemon(paths: StatePaths, *, poll_s: float | None = None, gateway_host: str = "127.0.0.1",
                 gateway_port: int | None = None, trace: bool = False, reuse: bool = False) -> dict[str, Any]:
    """Start a detached daemon and wait until it answers; its status. With `reuse`, a running one is fine."""
    client = DaemonClient(paths)
    try:
        doc = client.request("GET", "/v1/daemon", timeout_s=5.0)
    except DaemonNotRunning:
        doc = None
    if doc is not None:
        if reuse:
            return dict(doc)
        from scepsy_hpc.service.daemon import DaemonRunning

        raise DaemonRunning(f"a scepsy daemon already runs for {paths.root} (pid {doc['pid']}, socket {paths.socket}); "
                            f"`scepsy daemon status` shows it, `scepsy daemon stop` stops it")
    paths.ensure()
    argv = [sys.executable, "-m", "scepsy_hpc.service.daemon", "--state-dir", str(paths.root), "--gateway-host", gateway_host]
    if poll_s:
        argv += ["--poll", str(poll_s)]
    if gateway_port:
        argv += ["--gateway-port", str(gateway_port)]
    if trace:
        argv.append("--trace")
    fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)   # a log an older scepsy left readable by others
    start_at = os.lseek(fd, 0, os.SEEK_END)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True,
                                cwd=str(paths.root), close_fds=True)
    finally:
        os.close(fd)
    if not client.wait_alive(START_TIMEOUT_S, proc_alive=lambda: proc.poll() is None):
        if proc.poll() is None:
            proc.terminate()
        text = _log_since(paths, start_at)
        raise ScepsyError(f"the scepsy daemon did not start (log {paths.log}):\n{text}".rstrip())
    return dict(client.request("GET", "/v1/daemon"))


def _log_since(paths: StatePaths, offset: int) -> str:
    try:
        with open(paths.log, "rb") as f:
            f.seek(offset)
            return f.read(8192).decode(errors="replace").strip() or log_tail(paths.log, 10)
    except OSError:
        return ""


def stop_daemon(paths: StatePaths, *, everything: bool = False, timeout_s: float = 180.0) -> int:
    """Ask the daemon to stop (with `everything`, every deployment and the gateway first) and wait until it has; its pid."""
    client = DaemonClient(paths)
    doc = client.request("POST", "/v1/daemon/stop", {"all": everything})
    pid = int(doc["pid"])
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        raise ScepsyError(f"the scepsy daemon (pid {pid}) is still running {timeout_s:g} s after it was asked to stop; "
                          f"see {paths.log}")
    return pid
