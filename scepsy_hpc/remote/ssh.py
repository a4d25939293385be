"""SSH connections to a login node with paramiko, the way OpenSSH's `ssh HOST` would make them.

- **~/.ssh/config** (`$SCEPSY_SSH_CONFIG` names another file) is applied by hand, as paramiko
  leaves it to the caller: HostName, User, Port, IdentityFile, IdentitiesOnly, UserKnownHostsFile,
  GlobalKnownHostsFile, ConnectTimeout and ProxyJump (`[user@]host[:port]`, comma-separated hops,
  each looked up in the config in turn; `none` for none). `user@host:port` on the command line
  overrides the config's User and Port.
- **Keys**: the SSH agent (unless IdentitiesOnly) and the identity files (the config's, else
  paramiko's defaults ~/.ssh/id_*); an encrypted key the agent does not hold is named, with the fix.
- **Host keys** are verified against known_hosts (UserKnownHostsFile, else ~/.ssh/known_hosts and
  known_hosts2, plus /etc/ssh/ssh_known_hosts), under `[host]:port` off port 22 as OpenSSH writes
  them. An unknown key and a changed key are refused with their SHA256 fingerprints and the command
  that fixes it; nothing is ever added (StrictHostKeyChecking in the config is not honoured for
  `no`/`accept-new`: a shared cluster is where a spoofed login node pays).
- **ProxyJump**: each hop is a `direct-tcpip` channel on the previous hop's transport, handed to
  the next connection as its socket; every hop's key is verified and authenticated in turn.
- Failures (DNS, refused, timeout, authentication, host keys, protocol) become `RemoteError`s that
  name the host, what was tried and the fix; exit status 255, as ssh's.

paramiko is blocking: asyncio code runs these calls in a thread.
"""

from __future__ import annotations

import base64
import hashlib
import os
import select
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from scepsy_hpc.errors import ScepsyError

CONFIG_ENV = "SCEPSY_SSH_CONFIG"
DEFAULT_TIMEOUT_S = 15.0
MAX_JUMPS = 8           # hops of a ProxyJump chain (a loop in the config ends here)
KEEPALIVE_S = 15        # transport keepalive: a dead path is noticed within a few of these


class RemoteError(ScepsyError):
    """An SSH connection or remote command failed (exit 255, as ssh's)."""

    exit_code = 255


class HostKeyError(RemoteError):
    """The server's host key is unknown, or differs from known_hosts: the connection is refused."""


@dataclass(frozen=True)
class Target:
    """Where and as whom to connect: one host of ~/.ssh/config, resolved (`resolve`)."""

    alias: str                          # what the user typed (the config's Host pattern it matched)
    hostname: str
    port: int = 22
    user: str = ""
    identity_files: tuple[str, ...] = ()
    identities_only: bool = False
    known_hosts: tuple[str, ...] = ()
    jumps: tuple["Target", ...] = ()    # ProxyJump hops, first hop first
    timeout_s: float = DEFAULT_TIMEOUT_S
    config_file: str | None = None

    @property
    def host_key_name(self) -> str:
        """The name known_hosts files this host under (`[host]:port` off port 22)."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def describe(self) -> str:
        via = f" via {' → '.join(j.alias for j in self.jumps)}" if self.jumps else ""
        return f"{self.user}@{self.hostname}:{self.port}{via}" if self.user else f"{self.hostname}:{self.port}{via}"


def config_path(explicit: str | None = None) -> Path | None:
    """The ssh config file to read: `explicit`, `$SCEPSY_SSH_CONFIG`, else ~/.ssh/config when it exists."""
    name = explicit or os.environ.get(CONFIG_ENV)
    if name:
        p = Path(name).expanduser()
        if not p.is_file():
            raise RemoteError(f"{p}: no such ssh config file (from {'--ssh-config' if explicit else CONFIG_ENV})")
        return p
    p = Path.home() / ".ssh" / "config"
    return p if p.is_file() else None


def _split_spec(spec: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` → (user, host, port); `[v6]:port` too."""
    user = None
    if "@" in spec:
        user, spec = spec.rsplit("@", 1)
    port = None
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif spec.count(":") == 1:
        host, p = spec.split(":")
        if not p.isdigit():
            raise RemoteError(f"{spec!r}: the port after ':' must be a number")
        port = int(p)
    else:
        host = spec
    if not host or any(c.isspace() for c in host) or host.startswith("-"):
        raise RemoteError(f"{spec!r} is not a host name: give HOST, USER@HOST or HOST:PORT (a Host of ~/.ssh/config)")
    return user, host, port


def resolve(spec: str, *, config_file: str | None = None, _depth: int = 0) -> Target:
    """`spec` (`[user@]host[:port]`, usually a Host alias of the ssh config) with the config applied."""
    import paramiko

    if _depth > MAX_JUMPS:
        raise RemoteError(f"ProxyJump: more than {MAX_JUMPS} hops to {spec!r}; is there a loop in the ssh config?")
    user, alias, port = _split_spec(spec)
    path = config_path(config_file)
    try:
        cfg = paramiko.SSHConfig.from_path(str(path)) if path else paramiko.SSHConfig()
        opts = cfg.lookup(alias)
    except (OSError, paramiko.SSHException, ValueError) as e:   # a bad line, an unreadable file
        raise RemoteError(f"{path}: cannot read the ssh config: {e}") from e
    try:
        port = port or int(opts.get("port", 22))
    except ValueError:
        raise RemoteError(f"{path}: Host {alias}: Port {opts.get('port')!r} is not a number") from None
    user = user or opts.get("user") or _local_user()
    files = tuple(str(Path(f).expanduser()) for f in opts.get("identityfile", []))
    known = [str(Path(f).expanduser()) for f in shlex.split(" ".join(opts.get("userknownhostsfile", "").split()))]
    if not known:
        known = [str(Path.home() / ".ssh" / "known_hosts"), str(Path.home() / ".ssh" / "known_hosts2")]
    glob = opts.get("globalknownhostsfile")
    known += [str(Path(f).expanduser()) for f in (glob.split() if glob else ["/etc/ssh/ssh_known_hosts"])]
    timeout = DEFAULT_TIMEOUT_S
    if "connecttimeout" in opts:
        try:
            timeout = float(opts["connecttimeout"])
        except ValueError:
            raise RemoteError(f"{path}: Host {alias}: ConnectTimeout {opts['connecttimeout']!r} is not a number") from None
    jumps: list[Target] = []
    pj = opts.get("proxyjump", "")
    if pj and pj.lower() != "none":
        for hop in pj.split(","):
            t = resolve(hop.strip(), config_file=config_file, _depth=_depth + 1)
            jumps.extend(t.jumps)   # a hop's own ProxyJump comes before it
            jumps.append(replace_jumps(t))
    if "proxycommand" in opts and not jumps:
        raise RemoteError(f"{path}: Host {alias} uses ProxyCommand, which scepsy does not run; use ProxyJump")
    return Target(alias=alias, hostname=opts.get("hostname", alias), port=port, user=user, identity_files=files,
                  identities_only=opts.get("identitiesonly", "no").lower() == "yes", known_hosts=tuple(known),
                  jumps=tuple(jumps), timeout_s=timeout, config_file=str(path) if path else None)


def replace_jumps(t: Target) -> Target:
    """`t` without its own jumps (they are hops of the chain before it)."""
    return Target(t.alias, t.hostname, t.port, t.user, t.identity_files, t.identities_only, t.known_hosts, (),
                  t.timeout_s, t.config_file)


def _local_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def fingerprint(key: Any) -> str:
    """`SHA256:…` as OpenSSH prints a key's fingerprint."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _known_hosts_file(t: Target) -> str:
    """The known_hosts file a fix should write: the first user file."""
    return t.known_hosts[0] if t.known_hosts else str(Path.home() / ".ssh" / "known_hosts")


def _keyscan(t: Target, key_type: str) -> str:
    kind = key_type.replace("ssh-", "").replace("ecdsa-sha2-nistp256", "ecdsa")
    port = f"-p {t.port} " if t.port != 22 else ""
    return f"ssh-keyscan {port}-t {kind} {t.hostname} >> {_known_hosts_file(t)}"


class _Refuse:
    """paramiko's missing-host-key policy: refuse, saying the key's fingerprint and the fix."""

    def __init__(self, t: Target) -> None:
        self.t = t

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        t = self.t
        raise HostKeyError(
            f"{t.alias}: the host key of {t.host_key_name} is not known ({key.get_name()} key {fingerprint(key)}; "
            f"looked in {', '.join(f for f in t.known_hosts if f)}). Nothing was sent. Check the fingerprint against "
            f"the one your site publishes, then add the key: `{_keyscan(t, key.get_name())}` "
            f"(or connect once with OpenSSH, `ssh {t.alias}`, and answer yes)")


def _changed(t: Target, e: Any) -> HostKeyError:
    return HostKeyError(
        f"{t.alias}: the host key of {t.host_key_name} has CHANGED: the server shows {e.key.get_name()} "
        f"{fingerprint(e.key)}, known_hosts has {fingerprint(e.expected_key)}. Someone may be intercepting the "
        f"connection, or the host was reinstalled. Nothing was sent. If your site confirms a new key, remove the old "
        f"one with `ssh-keygen -R '{t.host_key_name}' -f {_known_hosts_file(t)}`, then add the new one: "
        f"`{_keyscan(t, e.key.get_name())}`")


@dataclass
class Connection:
    """An authenticated SSH connection (and the hops it went through); close() closes them all."""

    target: Target
    clients: list[Any] = field(default_factory=list)   # paramiko.SSHClient, first hop first

    @property
    def client(self) -> Any:
        return self.clients[-1]

    @property
    def transport(self) -> Any:
        return self.client.get_transport()

    def alive(self) -> bool:
        tr = self.transport
        return tr is not None and tr.is_active()

    def sftp(self) -> Any:
        try:
            return self.client.open_sftp()
        except Exception as e:  # noqa: BLE001 — paramiko raises SSHException/EOFError/OSError here
            raise RemoteError(f"{self.target.alias}: the server offers no SFTP ({type(e).__name__}: {e}); "
                              f"ask the site to enable the sftp subsystem") from e

    def exec(self, command: str, *, out: IO[bytes] | None = None, err: IO[bytes] | None = None,
             interruptible: bool = False, poll_s: float = 0.2) -> int:
        """Run `command` with the remote user's shell; stream its stdout and stderr to `out`/`err`
        as they arrive; return its exit status. The command's stdin is closed at once, or, with
        `interruptible`, on the first Ctrl-C (a command that watches it, `remote.run.WRAPPER`, takes
        that as SIGINT), its output still streamed until it exits; a second Ctrl-C drops it."""
        try:
            chan = self.transport.open_session(timeout=self.target.timeout_s)
            chan.exec_command(command)
        except Exception as e:  # noqa: BLE001 — the transport died or refused the session
            raise RemoteError(f"{self.target.alias}: cannot run a command: {type(e).__name__}: {e}") from e
        if not interruptible:
            chan.shutdown_write()   # no stdin: a command that reads it sees end-of-file
        interrupted = False
        try:
            while True:
                try:
                    if self._pump(chan, out, err, poll_s):
                        break
                except KeyboardInterrupt:
                    if not interruptible or interrupted:
                        raise
                    interrupted = True
                    chan.shutdown_write()
            status = chan.recv_exit_status() if chan.exit_status_ready() else -1
        finally:
            chan.close()
        if status == -1 and not self.alive():
            raise RemoteError(f"{self.target.alias}: the SSH connection ended before the command did")
        if status == -1:
            # ended by a signal: sshd says so with "exit-signal", which paramiko does not read. After our Ctrl-C
            # that was the SIGINT we asked for, so the shell's figure for it; anything else is said
            if interrupted:
                return 128 + 2
            raise RemoteError(f"{self.target.alias}: the remote command was killed by a signal (no exit status); "
                              f"on a login node that is often a CPU or memory limit: see its logs")
        return status

    @staticmethod
    def _pump(chan: Any, out: IO[bytes] | None, err: IO[bytes] | None, poll_s: float) -> bool:
        """Copy what the channel has; True once the command has exited and everything is read."""
        got = False
        while chan.recv_ready():
            data = chan.recv(65536)
            if out is not None:
                out.write(data)
                out.flush()
            got = True
        while chan.recv_stderr_ready():
            data = chan.recv_stderr(65536)
            if err is not None:
                err.write(data)
                err.flush()
            got = True
        if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
            return True
        tr = chan.get_transport()
        if chan.closed or tr is None or not tr.is_active():
            return True
        if not got:
            select.select([chan], [], [], poll_s)
        return False

    def close(self) -> None:
        for c in reversed(self.clients):
            try:
                c.close()
            except Exception:  # noqa: BLE001 — closing a dead connection
                pass
        self.clients.clear()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_connection(target: Target, *, timeout: float | None = None) -> Connection:
    """Connect to `target` through its jumps, every host key verified and every hop authenticated."""
    conn = Connection(target)
    sock: Any = None
    try:
        hops = [*target.jumps, replace_jumps(target)]
        for i, hop in enumerate(hops):
            if i > 0:
                prev = conn.clients[-1].get_transport()
                try:
                    sock = prev.open_channel("direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0),
                                             timeout=timeout or hop.timeout_s)
                except Exception as e:  # noqa: BLE001 — ChannelException (refused by the jump host), SSHException
                    raise RemoteError(f"{target.alias}: the jump host {hops[i - 1].alias} could not reach "
                                      f"{hop.hostname}:{hop.port} ({type(e).__name__}: {e}); check ProxyJump and "
                                      f"HostName in {target.config_file or '~/.ssh/config'}") from e
            conn.clients.append(_connect_one(hop, sock, timeout or hop.timeout_s, via=hops[i - 1].alias if i else None))
            if i == 0:   # small writes (a call, a stream's events) go out at once: +3 ms a call, not +43
                _nodelay(conn.clients[0])
        conn.transport.set_keepalive(KEEPALIVE_S)
        return conn
    except BaseException:
        conn.close()
        raise


def _nodelay(client: Any) -> None:
    tr = client.get_transport()
    sock = getattr(tr, "sock", None)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):   # not a TCP socket
        pass


def _connect_one(t: Target, sock: Any, timeout: float, via: str | None) -> Any:
    import paramiko

    client = paramiko.SSHClient()
    for f in t.known_hosts:
        if f and os.path.isfile(f):
            try:
                client.get_host_keys().load(f)
            except (OSError, paramiko.SSHException, ValueError) as e:
                raise RemoteError(f"{f}: cannot read known_hosts: {e}") from e
    client.set_missing_host_key_policy(_Refuse(t))
    keys = [f for f in t.identity_files if os.path.isfile(f)]
    where = f"{t.hostname}:{t.port}" + (f" (via {via})" if via else "")
    try:
        client.connect(t.hostname, port=t.port, username=t.user, key_filename=keys or None,
                       look_for_keys=not t.identities_only and not keys, allow_agent=not t.identities_only,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout, channel_timeout=timeout,
                       sock=sock)
        return client
    except HostKeyError:
        client.close()
        raise
    except paramiko.BadHostKeyException as e:
        client.close()
        raise _changed(t, e) from None
    except paramiko.PasswordRequiredException as e:
        client.close()
        raise RemoteError(f"{t.alias}: a key is encrypted and the SSH agent does not hold it ({e}): run `ssh-add "
                          f"{keys[0] if keys else '~/.ssh/id_ed25519'}` once, then retry") from None
    except paramiko.AuthenticationException:
        client.close()
        tried = ", ".join(keys) if keys else "the default keys (~/.ssh/id_*)"
        agent = "" if t.identities_only else " and the SSH agent's"
        raise RemoteError(f"{t.alias}: {where} refused user {t.user!r} with {tried}{agent}: set User and IdentityFile "
                          f"for Host {t.alias} in {t.config_file or '~/.ssh/config'}, or install your public key there "
                          f"(`ssh-copy-id {t.alias}`)") from None
    except socket.gaierror as e:
        client.close()
        raise RemoteError(f"{t.alias}: cannot resolve host name {t.hostname!r} ({e.strerror}); check HostName for "
                          f"Host {t.alias} in {t.config_file or '~/.ssh/config'}") from None
    except (socket.timeout, TimeoutError):
        client.close()
        raise RemoteError(f"{t.alias}: no answer from {where} within {timeout:g} s; is the host up and the port "
                          f"right? (ConnectTimeout in the ssh config raises the limit)") from None
    except (ConnectionRefusedError, paramiko.ssh_exception.NoValidConnectionsError):
        client.close()
        raise RemoteError(f"{t.alias}: {where} refused the connection: no SSH server listens there (check Port)") from None
    except (paramiko.SSHException, OSError, EOFError) as e:
        client.close()
        said = str(e).lower()
        if "banner" in said or "no existing session" in said:   # a port that takes the connection, speaks no SSH
            raise RemoteError(f"{t.alias}: {where} accepted the connection but no SSH server answered within "
                              f"{timeout:g} s (is that the SSH port? check Port)") from None
        raise RemoteError(f"{t.alias}: SSH to {where} failed: {type(e).__name__}: {e}") from None


def connect(spec: str, *, config_file: str | None = None, timeout: float | None = None) -> Connection:
    """`resolve` then `open_connection`."""
    return open_connection(resolve(spec, config_file=config_file), timeout=timeout)


def retry_delays(first_s: float = 0.5, cap_s: float = 30.0) -> Iterator[float]:
    """Backoff between reconnection attempts: doubling from `first_s` up to `cap_s`."""
    d = first_s
    while True:
        yield d
        d = min(d * 2, cap_s)
