"""Where the daemon keeps its state, and the checks that keep one user's state out of another's reach.

    <state dir>/state.db         deployments, jobs, instances, events (SQLite, WAL)
               /daemon.lock      held (flock) by the running daemon; holds its pid
               /daemon.sock      the control API (HTTP/JSON over a unix socket, mode 0600)
               /daemon.log       the daemon's log
               /gateway/         the gateway's endpoints file (0600: it holds engine secrets), log, pid file
               /gateway/traces/  one trace per gateway start: gateway-<UTC time>-<daemon pid>.jsonl
               /deployments/N/owner.key   the owner's client key (0600; `scepsy keys show N`)
               /deployments/N/   one session directory per deployment (serve.json, plan.yaml, agents/, logs/)
               /.local-jobs/     the local backend's job records

The state dir and everything in it are this user's only: directories 0700, files 0600.

The state dir is `--state-dir`, else `$SCEPSY_STATE_DIR`, else `~/.scepsy/HOST` (one daemon per user and
login node: a home directory shared by several login nodes gets one state dir per node). On a cluster
it must be on a file system the compute nodes share, since the node agents read their session
directories; the database and the socket are used on the login node only.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from scepsy_hpc.errors import ScepsyError

# sun_path holds 108 bytes on Linux (104 on macOS); a longer socket path cannot be bound
_SUN_PATH_MAX = 100


class StateDirError(ScepsyError):
    """The state directory (or the daemon's socket in it) is not one this user may use."""


def default_state_dir() -> Path:
    """`$SCEPSY_STATE_DIR`, else ~/.scepsy/HOST (absolute)."""
    env = os.environ.get("SCEPSY_STATE_DIR")
    if env:
        return Path(env).absolute()
    return (Path.home() / ".scepsy" / socket.gethostname().split(".")[0]).absolute()


@dataclass(frozen=True)
class StatePaths:
    """The files of one state directory."""

    root: Path

    @classmethod
    def of(cls, arg: str | os.PathLike[str] | None = None) -> "StatePaths":
        """The state dir named by --state-dir, else the default."""
        return cls(Path(arg).absolute() if arg else default_state_dir())

    @property
    def db(self) -> Path:
        """The SQLite state database."""
        return self.root / "state.db"

    @property
    def lock(self) -> Path:
        """The daemon's lock file."""
        return self.root / "daemon.lock"

    @property
    def log(self) -> Path:
        """The daemon's log."""
        return self.root / "daemon.log"

    @property
    def gateway_dir(self) -> Path:
        """The gateway's files."""
        return self.root / "gateway"

    @property
    def deployments(self) -> Path:
        """One session directory per deployment."""
        return self.root / "deployments"

    @property
    def local_jobs(self) -> Path:
        """The local backend's job records."""
        return self.root / ".local-jobs"

    @property
    def socket(self) -> Path:
        """The control socket: in the state dir, or (when that path is too long for a unix socket) in a
        private directory under /tmp named after the state dir, so every client finds the same one."""
        path = self.root / "daemon.sock"
        if len(os.fsencode(path)) <= _SUN_PATH_MAX:
            return path
        digest = hashlib.sha256(os.fsencode(self.root)).hexdigest()[:16]
        return Path("/tmp") / f"scepsy-{os.getuid()}" / f"{digest}.sock"

    def session_dir(self, name: str) -> Path:
        """The session directory of deployment `name`."""
        return self.deployments / name

    @property
    def traces(self) -> Path:
        """The gateway's traces, one file per gateway start."""
        return self.gateway_dir / "traces"

    def ensure(self) -> None:
        """Create the state dir (0700) and check that it, and the socket's directory, are this user's own; a
        state dir others may read or enter is narrowed to 0700, with a warning in the daemon's log."""
        for d in {self.root, self.socket.parent}:
            mkdir_private(d)
            check_owned(d, "state directory" if d == self.root else "socket directory")
            mode = stat.S_IMODE(d.stat().st_mode)
            if mode & 0o077:
                os.chmod(d, 0o700)
                if d == self.root:
                    self.warn(f"state directory {d} was mode {mode:o} (others could read it): narrowed to 700")

    def warn(self, message: str) -> None:
        """Append a warning to the daemon's log (0600), whoever notices it: the CLI or the daemon."""
        import time

        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchmod(fd, 0o600)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            os.write(fd, f"{stamp} WARNING scepsy_hpc.service: {message}\n".encode())
        finally:
            os.close(fd)


def mkdir_private(path: Path) -> None:
    """Create `path` and any missing parent, each 0700 (mkdir's mode is narrowed by the umask, never widened; a
    parent made with the umask's mode could be open to others under `umask 000`)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)


def check_owned(path: Path, what: str) -> None:
    """StateDirError unless `path` belongs to this user (and, for a directory, no one else may write to it)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise StateDirError(f"{what} {path} is a symbolic link; refusing to use it: point --state-dir (or "
                            f"$SCEPSY_STATE_DIR) at a real directory of your own")
    if st.st_uid != os.getuid():
        raise StateDirError(f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); refusing to use "
                            f"it: set --state-dir (or $SCEPSY_STATE_DIR) to a directory of your own")
    if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o022:
        raise StateDirError(f"{what} {path} can be written by others (mode {stat.S_IMODE(st.st_mode):o}); "
                            f"`chmod go-w {path}` or use another --state-dir")
