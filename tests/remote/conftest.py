"""Remote fixtures: two real OpenSSH servers on loopback (scripts/sshd-local.sh), or a skip without them.

`sshd` (session) starts the "login" and "jump" servers through the script, or uses those already running, and
points SCEPSY_SSH_CONFIG at their ssh_config for the session: the aliases scepsy-login, scepsy-jump and
scepsy-via-jump (the login server through ProxyJump scepsy-jump) then resolve like any host in ~/.ssh/config.
It stops the servers at the end only when it started them. Where they cannot run the tests skip; with CI=true
they fail instead: there the servers are part of the job, and a skip would hide that they never came up.

`unknown_host_key` and `changed_host_key` give a known_hosts file (and an ssh_config that uses it) in which the
login server is missing, or listed with another ed25519 key: what a first connection and a reinstalled or
spoofed server look like to the client.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pytest

Server = Literal["login", "jump"]

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sshd-local.sh"
_SSHD = Path("/usr/sbin/sshd")
# sshd-session: the per-connection program from OpenSSH 9.8 on (Debian 12 ships 9.2, where it is sshd itself)
_SSHD_COMMS = frozenset({"sshd", "sshd-session"})


@dataclass(frozen=True)
class ServerConnection:
    """One client connection as the server sees it: its sshd processes and the client's TCP port."""

    pid: int  # the per-connection sshd, a child of the listener (retitled "sshd: USER [priv]" or "sshd: USER")
    pids: tuple[int, ...]  # it and the sshds below it (a non-root login's "sshd: USER@notty"): what a kill signals
    client_port: int | None  # the peer port of its TCP socket; None when it holds none (yet)


@dataclass(frozen=True)
class HostKeyCase:
    """A known_hosts file that does not vouch for the login server, and an ssh_config that uses it."""

    known_hosts: Path
    ssh_config: Path  # sshd.ssh_config with UserKnownHostsFile pointed at known_hosts
    fingerprint: str  # the login server's real key, "SHA256:…" (what a refusal should show)
    listed_fingerprint: str | None  # the key known_hosts lists for it instead; None when it lists none


@dataclass(frozen=True)
class SshdServers:
    """The running servers of scripts/sshd-local.sh: where their files are, and a few probes."""

    login_alias: ClassVar[str] = "scepsy-login"
    jump_alias: ClassVar[str] = "scepsy-jump"
    via_jump_alias: ClassVar[str] = "scepsy-via-jump"  # the login server, through ProxyJump scepsy-jump

    state_dir: Path
    ssh_config: Path
    known_hosts: Path
    client_key: Path  # the private key (no passphrase); client_key.with_suffix(".pub") is in authorized_keys
    user: str  # the one user both servers admit (the one running them)
    host: str  # 127.0.0.1: both listen on loopback only
    login_port: int
    jump_port: int
    login_log: Path
    jump_log: Path

    @classmethod
    def read(cls, state_dir: Path) -> SshdServers:
        """The servers whose state (configs, keys, logs) is in state_dir."""
        return cls(
            state_dir=state_dir,
            ssh_config=state_dir / "ssh_config",
            known_hosts=state_dir / "known_hosts",
            client_key=state_dir / "id_ed25519",
            user=pwd.getpwuid(os.getuid()).pw_name,
            host="127.0.0.1",
            login_port=_config_port(state_dir / "login" / "sshd_config"),
            jump_port=_config_port(state_dir / "jump" / "sshd_config"),
            login_log=state_dir / "login" / "sshd.log",
            jump_log=state_dir / "jump" / "sshd.log",
        )

    def port(self, server: Server) -> int:
        """The server's port on 127.0.0.1."""
        return self.login_port if server == "login" else self.jump_port

    def log(self, server: Server) -> Path:
        """The server's log (sshd -E, LogLevel DEBUG1: logins, and each direct-tcpip forward it opens)."""
        return self.login_log if server == "login" else self.jump_log

    def log_offset(self, server: Server) -> int:
        """The log's size now: pass it to log_text(since=…) to read only what a test caused."""
        return self.log(server).stat().st_size

    def log_text(self, server: Server, *, since: int = 0) -> str:
        """The server's log from byte offset `since` on."""
        with self.log(server).open("rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def host_key_path(self, server: Server) -> Path:
        """The server's public host key (ed25519)."""
        return self.state_dir / server / "ssh_host_ed25519_key.pub"

    def fingerprint(self, server: Server) -> str:
        """The server's host key fingerprint as OpenSSH prints it: "SHA256:" and unpadded base64."""
        return _fingerprint(self.host_key_path(server).read_text().split()[1])

    def listener_pid(self, server: Server) -> int:
        """The server's listening sshd, checked to be ours (its command line names our config)."""
        pid = int((self.state_dir / server / "sshd.pid").read_text())
        # sshd retitles itself ("sshd: /usr/sbin/sshd -f CONFIG -E LOG [listener] …"): one string, spaces kept
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        if _comm(pid) != "sshd" or f"-f {self.state_dir / server / 'sshd_config'} " not in cmdline:
            raise LookupError(f"pid {pid} in {self.state_dir / server / 'sshd.pid'} is not our {server} sshd")
        return pid

    def connections(self, server: Server) -> list[ServerConnection]:
        """The server's client connections now, one per per-connection sshd below its listener."""
        listener = self.listener_pid(server)
        table = _processes()
        inodes = _tcp_peer_ports(self.port(server))
        found = []
        for pid, (comm, ppid, _) in table.items():
            if ppid != listener or comm not in _SSHD_COMMS:
                continue
            pids = (pid, *_descendants(table, pid))
            ports = {inodes[i] for p in pids for i in _socket_inodes(p) if i in inodes}
            found.append(ServerConnection(pid=pid, pids=pids, client_port=min(ports) if ports else None))
        return sorted(found, key=lambda c: c.pid)

    def kill_connections(self, server: Server = "login", *, client_port: int | None = None,
                         sig: int = signal.SIGKILL, timeout_s: float = 5.0) -> list[ServerConnection]:
        """Kill the server side of client connections, as a crashed or restarted login node would.

        Each connection has its own sshd below the listener (found by parent pid, since sshd retitles them);
        every sshd process of the connection gets `sig` (SIGKILL: the kernel closes the socket, the client
        reads EOF or a reset), then this waits until they are gone. The listener lives on, so the client can
        reconnect. With client_port, only the connection whose TCP peer port is client_port (the client's
        `transport.sock.getsockname()[1]`); a connection through ProxyJump reaches the login server from the
        jump sshd, so kill it on "jump" by client port, or on "login" without one. Raises LookupError when no
        connection matches, so that a test never passes by killing nothing.
        """
        conns = self.connections(server)
        chosen = [c for c in conns if client_port is None or c.client_port == client_port]
        if not chosen:
            seen = ", ".join(f"pid {c.pid} from port {c.client_port}" for c in conns) or "none"
            want = f" from client port {client_port}" if client_port is not None else ""
            raise LookupError(f"no connection{want} to the {server} sshd on port {self.port(server)} (it has: {seen})")
        pids = [p for c in chosen for p in c.pids]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while any(_running(p) for p in pids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"sshd processes {[p for p in pids if _running(p)]} outlived signal {sig} "
                                   f"by {timeout_s} s")
            time.sleep(0.02)
        return chosen


def _config_port(sshd_config: Path) -> int:
    for line in sshd_config.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "Port":
            return int(value)
    raise LookupError(f"no Port line in {sshd_config}")


def _fingerprint(key_b64: str) -> str:
    digest = hashlib.sha256(base64.b64decode(key_b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# --- the process table, from /proc (Linux) ---------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(comm, ppid, state) of a process, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    state, ppid = raw[raw.rindex(")") + 2 :].split()[:2]
    return comm, int(ppid), state


def _comm(pid: int) -> str | None:
    stat = _stat(pid)
    return stat[0] if stat else None


def _running(pid: int) -> bool:
    # a zombie counts as gone: PID 1 in a container may never reap what the listener's death orphaned
    stat = _stat(pid)
    return stat is not None and stat[2] != "Z"


def _processes() -> dict[int, tuple[str, int, str]]:
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[2] != "Z":
            table[int(entry.name)] = stat
    return table


def _descendants(table: dict[int, tuple[str, int, str]], root: int) -> list[int]:
    """The sshd processes below root (not the user's commands a session runs)."""
    below, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (comm, ppid, _) in table.items() if ppid == parent and comm in _SSHD_COMMS]
        below += kids
        frontier += kids
    return below


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, PermissionError):
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _tcp_peer_ports(local_port: int) -> dict[int, int]:
    """{socket inode: peer port} of the TCP sockets on local_port (IPv4 and IPv6)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            fields = line.split()
            listening = fields[3] == "0A"
            if not listening and int(fields[1].rsplit(":", 1)[1], 16) == local_port and int(fields[9]):
                found[int(fields[9])] = int(fields[2].rsplit(":", 1)[1], 16)
    return found


# --- fixtures --------------------------------------------------------------------------------------------


def _state_dir() -> Path:
    return Path(os.environ.get("SCEPSY_SSHD_DIR") or f"/tmp/scepsy-sshd-{os.getuid()}")


def _listeners_up(state_dir: Path) -> bool:
    if not (state_dir / "ssh_config").exists():
        return False
    servers = SshdServers.read(state_dir)
    try:
        servers.listener_pid("login")
        servers.listener_pid("jump")
    except (OSError, ValueError, LookupError):
        return False
    return True


def _script(command: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(_SCRIPT), command], capture_output=True, text=True, timeout=timeout_s)


def _start_problem() -> str | None:
    """Start the servers (or find them up); why they cannot run here, or None when they run."""
    if shutil.which("ssh") is None:
        return "OpenSSH's client `ssh` is not on PATH (install openssh-client)"
    if not _SSHD.exists() and not (os.environ.get("CI") == "true" and os.geteuid() == 0):
        # Installing a system package is for the script run by hand, or CI, not a side effect of pytest.
        return f"openssh-server is not installed (no {_SSHD}); `sudo scripts/sshd-local.sh start` installs it"
    try:
        # the timeout covers apt-get installing openssh-server in CI; a start from scratch takes a few seconds
        done = _script("start", timeout_s=300)
    except subprocess.TimeoutExpired:
        return "`scripts/sshd-local.sh start` did not finish within 300 s"
    if done.returncode != 0:
        return f"`scripts/sshd-local.sh start` exited {done.returncode}:\n{(done.stdout + done.stderr).strip()}"
    return None


@pytest.fixture(scope="session")
def sshd() -> Iterator[SshdServers]:
    """The login and jump sshds (skip, or fail when CI=true, where they cannot run); SCEPSY_SSH_CONFIG set."""
    state_dir = _state_dir()
    was_up = _listeners_up(state_dir)
    problem = _start_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the local sshd servers did not start: {problem}", pytrace=False)
        pytest.skip(f"no local sshd servers: {problem}")
    servers = SshdServers.read(state_dir)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SCEPSY_SSH_CONFIG", str(servers.ssh_config))
        yield servers
    if not was_up:
        _script("stop", timeout_s=30)


def _host_key_case(sshd: SshdServers, tmp_path: Path, *, listed_key: str | None) -> HostKeyCase:
    """known_hosts as sshd's, with the login server's line dropped or given listed_key; its ssh_config."""
    login_line = f"[{sshd.host}]:{sshd.login_port},"
    lines = []
    for line in sshd.known_hosts.read_text().splitlines():
        if line.startswith(login_line):
            if listed_key is None:
                continue
            names = line.split()[0]  # every name the login server goes by, aliases included
            line = f"{names} ssh-ed25519 {listed_key}"
        lines.append(line)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("\n".join(lines) + "\n")
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(sshd.ssh_config.read_text().replace(str(sshd.known_hosts), str(known_hosts)))
    ssh_config.chmod(0o600)  # OpenSSH refuses a config others may write
    return HostKeyCase(known_hosts=known_hosts, ssh_config=ssh_config, fingerprint=sshd.fingerprint("login"),
                       listed_fingerprint=_fingerprint(listed_key) if listed_key else None)


@pytest.fixture
def unknown_host_key(sshd: SshdServers, tmp_path: Path) -> HostKeyCase:
    """A known_hosts (and ssh_config) that lists the jump server but not the login server under any name."""
    return _host_key_case(sshd, tmp_path, listed_key=None)


@pytest.fixture
def changed_host_key(sshd: SshdServers, tmp_path: Path) -> HostKeyCase:
    """A known_hosts (and ssh_config) listing another ed25519 key for the login server under all its names.

    The same key type as the server's: a client that finds no key of the offered type reports an unknown
    host, not a changed one (paramiko and OpenSSH alike). The jump server's line stays right.
    """
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "not-the-login-server", "-f", str(other)],
                   check=True, capture_output=True, timeout=30)
    return _host_key_case(sshd, tmp_path, listed_key=other.with_suffix(".pub").read_text().split()[1])
