"""A local port forwarded over SSH to a deployment's gateway on the login node (`scepsy tunnel`).

What `ssh -N -L P:GATEWAY:PORT HOST` does, plus what a tunnel left open for hours needs:

- **One SSH connection, many forwarded connections.** Each accepted local connection becomes a
  `direct-tcpip` channel to the gateway, copied by two threads, one per direction: paramiko is
  blocking, and a channel's send waits for the server's window while a socket's waits for the
  client, so one thread per direction never lets one side's backpressure stall the other (a
  response streams while its request is still being sent).
- **Watched, and re-established.** The supervisor (`Tunnel.run`, the caller's thread) checks the
  transport every `POLL_S` and, every `probe_s`, sends a keepalive request that must be answered
  within `probe_timeout_s` (a path that died silently, with no FIN, is noticed then, as with
  OpenSSH's ServerAliveInterval). A lost connection is reconnected with backoff
  (`ssh.retry_delays`), saying so; the gateway's address is read again on the new connection (a
  restarted daemon may have moved it). The listener stays bound: local connections that arrive
  meanwhile wait up to `pending_wait_s`, then are closed. A host-key error is never retried.
- **Bounded.** At most `max_conns` forwarded connections (more are closed at once, said so at most
  once a second); each holds at most `CHUNK_BYTES` per direction in flight plus its channel's
  receive window `WINDOW_BYTES` (paramiko's own default, 2 MiB, would allow 512 MiB at the cap).

`find_gateway` learns where the gateway is by running `scepsy status NAME --json` on the login node.
"""

from __future__ import annotations

import ipaddress
import io
import json
import os
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError

from scepsy_hpc.errors import ScepsyError, SpecError
from scepsy_hpc.remote.run import NOT_FOUND, client_config_path
from scepsy_hpc.remote.ssh import KEEPALIVE_S, Connection, HostKeyError, RemoteError, retry_delays

CHUNK_BYTES = 32 * 1024       # one read, one channel packet
WINDOW_BYTES = 512 * 1024     # a channel's receive window: what the server may send ahead of the local client
MAX_CONNS = 256
PENDING_WAIT_S = 20.0         # how long a local connection waits for a lost SSH connection to come back
PROBE_TIMEOUT_S = 30.0        # a keepalive unanswered this long: the connection is lost
POLL_S = 0.2                  # how often the supervisor looks at the transport and at the stop event
OPEN_TIMEOUT_S = 15.0         # opening one channel (the server connects to the gateway meanwhile)
SERVING = ("serving", "degraded")


@dataclass(frozen=True)
class Gateway:
    """A deployment's gateway as the login node sees it (`scepsy status NAME --json` run there)."""

    name: str
    state: str
    url: str          # the gateway's root, e.g. http://127.0.0.1:33265
    base_url: str     # the deployment's OpenAI base URL, e.g. http://127.0.0.1:33265/d/NAME/v1

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the login node connects to."""
        u = urlsplit(self.url)
        return u.hostname or "127.0.0.1", u.port or 80

    @property
    def path(self) -> str:
        """The base URL's path (`/d/NAME/v1`), which the local URL keeps."""
        return urlsplit(self.base_url).path


class _Status(BaseModel):
    """The part of `scepsy status NAME --json` read here."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    name: str
    state: str
    gateway_url: str | None = None
    base_url: str | None = None
    error: str | None = None


class _Failure(BaseModel):
    """`{"error": {...}}` of a command that failed with --json (`errors.error_document`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    type: str
    message: str
    exit_code: int = 1


def find_gateway(conn: Connection, name: str, remote_scepsy: str = "scepsy") -> Gateway:
    """Deployment `name`'s gateway, from `REMOTE_SCEPSY status NAME --json` run on the login node; it must serve."""
    alias = conn.target.alias
    cmd = f"{remote_scepsy} status {shlex.quote(name)} --json"
    out, err = io.BytesIO(), io.BytesIO()
    rc = conn.exec(cmd, out=out, err=err)
    said = err.getvalue().decode(errors="replace").strip()[-600:]
    try:
        doc = json.loads(out.getvalue() or b"null")
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        if rc == NOT_FOUND:
            raise RemoteError(f"{alias}: `{remote_scepsy}` was not found there ({said or 'exit 127'}): install scepsy "
                              f"on the login node, then name it with --remote-scepsy PATH or `hosts: {{{alias}: "
                              f"{{scepsy: PATH}}}}` in {client_config_path()}")
        raise RemoteError(f"{alias}: `{cmd}` exited {rc} without a JSON status: {said or '(nothing on stderr)'}")
    try:
        if isinstance(doc.get("error"), dict):   # a ScepsyError's document (`errors.error_document`)
            f = _Failure.model_validate(doc["error"])
            if f.type == "SpecError":   # no such deployment (the message lists those there)
                raise SpecError(f"on {alias}: {f.message}")
            exc = ScepsyError(f"on {alias}: {f.message}")
            exc.exit_code = f.exit_code
            raise exc
        s = _Status.model_validate(doc)
    except ValidationError as e:
        raise RemoteError(f"{alias}: `{cmd}` printed a status this scepsy cannot read ({e.error_count()} problems, "
                          f"first: {e.errors()[0]['msg']}); are both ends the same scepsy version?") from None
    if s.state not in SERVING or not s.gateway_url or not s.base_url:
        why = f": {s.error}" if s.error else ""
        raise SpecError(f"deployment {name!r} on {alias} is {s.state}, not serving{why}: nothing to forward to "
                        f"(`scepsy --remote {alias} status {name}`)")
    return Gateway(name=s.name, state=s.state, url=s.gateway_url, base_url=s.base_url)


def check_bind(host: str) -> bool:
    """Whether `host` (an IP address or `localhost`) is a loopback address; SpecError when it is no address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise SpecError(f"tunnel --bind {host!r}: give an IP address of this machine (default 127.0.0.1)") from None


def local_url(address: tuple[str, int], path: str) -> str:
    """The URL a local client uses for a listener bound at `address` (an unspecified address as 127.0.0.1)."""
    host, port = address[0], address[1]
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def _stderr(line: str) -> None:
    import sys

    sys.stderr.write(line + "\n")   # one write: lines said from several threads do not interleave
    sys.stderr.flush()


def _reason(conn: Connection) -> str:
    tr = conn.transport
    e = tr.get_exception() if tr is not None else None
    if e is None or isinstance(e, EOFError):
        return "the server closed it"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class Tunnel:
    """A local listener whose connections are forwarded over one (re-established) SSH connection.

    `connect()` opens a Connection (called again after a loss); `locate(conn)` returns the (host, port)
    to forward to as that connection's server sees it. `start()` connects, locates and binds; `run(stop)`
    supervises until `stop` is set, then closes everything; `close()` may be called from anywhere.
    """

    def __init__(self, connect: Callable[[], Connection], locate: Callable[[Connection], tuple[str, int]], *,
                 bind: tuple[str, int] = ("127.0.0.1", 0), max_conns: int = MAX_CONNS,
                 pending_wait_s: float = PENDING_WAIT_S, probe_s: float = float(KEEPALIVE_S),
                 probe_timeout_s: float = PROBE_TIMEOUT_S, delays: Callable[[], Iterator[float]] = retry_delays,
                 say: Callable[[str], None] = _stderr) -> None:
        self.connect = connect
        self.locate = locate
        self.bind = bind
        self.max_conns = max_conns
        self.pending_wait_s = pending_wait_s
        self.probe_s = probe_s
        self.probe_timeout_s = probe_timeout_s
        self.delays = delays
        self.say = say
        self.dest: tuple[str, int] = ("", 0)
        self.address: tuple[str, int] = ("", 0)   # where the listener is bound, once started
        self.forwarded = 0                        # local connections given a channel, in all
        self.reconnects = 0
        self._conn: Connection | None = None
        self._alias = ""
        self._cond = threading.Condition()        # guards _conn, _open, _closing; notified when _conn comes back
        self._open: set[tuple[socket.socket, Any]] = set()   # (local socket, channel or None) being served
        self._closing = False
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._refused_at = 0.0
        self._refused_unsaid = 0
        self._stale = 0.0                         # when a channel was refused with the connection up (re-locate)

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Connect, locate the destination, bind the listener and start accepting; the bound address."""
        conn = self.connect()
        try:
            self._alias = conn.target.alias
            self.dest = self.locate(conn)
            self._listener = self._listen()
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self.address = self._listener.getsockname()[:2]
        self._acceptor = threading.Thread(target=self._accept_loop, name="tunnel-accept", daemon=True)
        self._acceptor.start()
        return self.address

    def _listen(self) -> socket.socket:
        host, port = self.bind
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            lsock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as e:
            fix = "choose another --local-port (0: any free one)" if port else "check --bind"
            why = os.strerror(e.errno) if e.errno else str(e)   # create_server's own text repeats the address
            raise SpecError(f"tunnel: cannot listen on {host}:{port}: {why}; {fix}") from None
        lsock.settimeout(POLL_S)   # accept() wakes up to see close()
        return lsock

    def run(self, stop: threading.Event) -> None:
        """Supervise the SSH connection until `stop` is set (HostKeyError on reconnection ends it); then close."""
        try:
            probe: tuple[float, threading.Event] | None = None
            next_probe = time.monotonic() + self.probe_s
            while not stop.wait(POLL_S):
                conn = self._conn
                if conn is None:   # closed from another thread
                    return
                lost = None if conn.alive() else _reason(conn)
                now = time.monotonic()
                if lost is None and probe is not None and not probe[1].is_set() and now - probe[0] > self.probe_timeout_s:
                    lost = f"no answer to a keepalive in {self.probe_timeout_s:g} s"
                if lost is not None:
                    self._reconnect(conn, lost, stop)
                    probe, next_probe = None, time.monotonic() + self.probe_s
                    continue
                if probe is not None and probe[1].is_set():
                    probe = None
                if probe is None and now >= next_probe:
                    probe, next_probe = (now, self._probe(conn)), now + self.probe_s
                if self._stale and now - self._stale > 5.0:
                    self._stale = 0.0
                    self._relocate(conn)
        finally:
            self.close()

    def close(self) -> None:
        """Stop accepting, end every forwarded connection and the SSH connection (idempotent)."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            conn, self._conn = self._conn, None
            pairs = list(self._open)
            self._cond.notify_all()
        if self._listener is not None:
            self._listener.close()
        for sock, _ in pairs:
            _shut(sock)
        if conn is not None:
            conn.close()   # closes every channel: the copying threads see it and end
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            self._acceptor.join(timeout=2.0)

    @property
    def active(self) -> int:
        """Local connections being served now (waiting for a channel included)."""
        with self._cond:
            return len(self._open)

    # -- the SSH connection -----------------------------------------------------------------------------------

    def _probe(self, conn: Connection) -> threading.Event:
        """Send a keepalive that wants an answer (in a thread: paramiko's wait has no timeout); set when answered."""
        done = threading.Event()

        def ask() -> None:
            try:
                conn.transport.global_request("keepalive@openssh.com", wait=True)   # a refusal is an answer too
            except Exception:  # noqa: BLE001 — a dead transport: the supervisor sees it as not alive
                pass
            done.set()

        threading.Thread(target=ask, name="tunnel-probe", daemon=True).start()
        return done

    def _reconnect(self, old: Connection, reason: str, stop: threading.Event) -> None:
        """Replace a lost connection, with backoff, until it is back or `stop` is set; HostKeyError is fatal."""
        with self._cond:
            self._conn = None if self._conn is old else self._conn
        old.close()
        delays = self.delays()
        delay = next(delays)
        self.say(f"tunnel: the connection to {self._alias} was lost ({reason}); reconnecting in {delay:.1f} s")
        attempt = 0
        while not stop.wait(delay):
            attempt += 1
            try:
                conn = self._connect_until(stop)
            except HostKeyError:
                raise
            except ScepsyError as e:
                delay = next(delays)
                self.say(f"tunnel: attempt {attempt} failed ({e}); retrying in {delay:.1f} s")
                continue
            if conn is None:   # stopped meanwhile
                return
            self._relocate(conn)
            with self._cond:
                if self._closing:
                    conn.close()
                    return
                self._conn = conn
                self._cond.notify_all()
            self.reconnects += 1
            self.say(f"tunnel: re-established (attempt {attempt})")
            return

    def _connect_until(self, stop: threading.Event) -> Connection | None:
        """`connect()` in a thread, so that Ctrl-C does not wait for a connect timeout; None when stopped first."""
        box: list[Any] = []

        def go() -> None:
            try:
                box.append(self.connect())
            except BaseException as e:  # noqa: BLE001 — handed to the supervisor below
                box.append(e)
            if stop.is_set() and not isinstance(box[0], BaseException):
                box[0].close()

        t = threading.Thread(target=go, name="tunnel-connect", daemon=True)
        t.start()
        while t.is_alive():
            t.join(POLL_S)
            if stop.is_set():
                return None
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _relocate(self, conn: Connection) -> None:
        """Read the destination again on `conn`; keep the old one when that fails."""
        try:
            dest = self.locate(conn)
        except ScepsyError as e:
            self.say(f"tunnel: could not read the gateway's address again ({e}); keeping {self.dest[0]}:{self.dest[1]}")
            return
        if dest != self.dest:
            self.say(f"tunnel: the gateway moved from {self.dest[0]}:{self.dest[1]} to {dest[0]}:{dest[1]}")
            self.dest = dest

    # -- local connections ------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        lsock = self._listener
        assert lsock is not None
        while not self._closing:
            try:
                sock, peer = lsock.accept()
            except socket.timeout:
                continue
            except OSError as e:
                if self._closing:
                    return
                self.say(f"tunnel: accept failed ({e}); going on")   # EMFILE: out of file descriptors for now
                time.sleep(POLL_S)
                continue
            with self._cond:
                full = len(self._open) >= self.max_conns or self._closing
                if not full:
                    self._open.add((sock, None))
            if full:
                self._refuse(sock, peer)
                continue
            threading.Thread(target=self._serve, args=(sock, peer), name="tunnel-conn", daemon=True).start()

    def _refuse(self, sock: socket.socket, peer: Any) -> None:
        sock.close()
        self._refused_unsaid += 1
        now = time.monotonic()
        if now - self._refused_at >= 1.0:
            self.say(f"tunnel: {self.max_conns} forwarded connections are open (the limit); closed "
                     f"{self._refused_unsaid} new one(s), the last from {peer[0]}:{peer[1]}")
            self._refused_at, self._refused_unsaid = now, 0

    def _serve(self, sock: socket.socket, peer: Any) -> None:
        chan = None
        try:
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            chan = self._channel(peer)
            if chan is None:
                return
            with self._cond:
                self._open.discard((sock, None))
                self._open.add((sock, chan))
                closing = self._closing
                self.forwarded += 0 if closing else 1
            if not closing:
                _splice(sock, chan)
        except OSError:
            pass   # the local client left before its channel was open
        finally:
            if chan is not None:
                chan.close()
            sock.close()
            with self._cond:
                self._open.discard((sock, chan))
                self._open.discard((sock, None))

    def _channel(self, peer: Any) -> Any:
        """A channel to the destination for one local connection; None (said why) when there will be none."""
        import paramiko

        deadline = time.monotonic() + self.pending_wait_s
        while True:
            with self._cond:
                while self._conn is None and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.say(f"tunnel: a local connection waited {self.pending_wait_s:g} s for the connection "
                                 f"to {self._alias} to come back; closed it")
                        return None
                    self._cond.wait(left)
                if self._closing:
                    return None
                conn = self._conn
            host, port = self.dest
            try:
                return conn.transport.open_channel("direct-tcpip", (host, port), (peer[0], peer[1]),
                                                   window_size=WINDOW_BYTES, max_packet_size=CHUNK_BYTES,
                                                   timeout=OPEN_TIMEOUT_S)
            except paramiko.ChannelException as e:   # the server could not connect there
                self._stale = self._stale or time.monotonic()
                self.say(f"tunnel: {self._alias} could not connect to the gateway at {host}:{port} "
                         f"({e.text or e.code}); closed a local connection")
                return None
            except (paramiko.SSHException, EOFError, OSError) as e:
                if conn.alive():
                    self.say(f"tunnel: opening a channel to {host}:{port} failed ({type(e).__name__}: {e}); "
                             f"closed a local connection")
                    return None
                if time.monotonic() > deadline:
                    self.say(f"tunnel: a local connection waited {self.pending_wait_s:g} s for the connection "
                             f"to {self._alias} to come back; closed it")
                    return None
                with self._cond:   # lost under us: wait for the supervisor to bring it back
                    if self._conn is conn:
                        self._cond.wait(POLL_S)


def _shut(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _splice(sock: socket.socket, chan: Any) -> None:
    """Copy bytes both ways until both directions ended (end of file each way) or either end failed."""
    back = threading.Thread(target=_copy_back, args=(chan, sock), name="tunnel-back", daemon=True)
    back.start()
    try:
        while True:
            data = sock.recv(CHUNK_BYTES)
            if not data:
                chan.shutdown_write()   # the client is done sending; the answer may still be coming
                break
            chan.sendall(data)
    except Exception:  # noqa: BLE001 — the client reset (OSError), or the channel died (SSHException, EOFError)
        chan.close()
        _shut(sock)
    back.join()


def _copy_back(chan: Any, sock: socket.socket) -> None:
    try:
        while True:
            data = chan.recv(CHUNK_BYTES)
            if not data:
                if chan.eof_received:
                    _shut(sock, socket.SHUT_WR)   # the gateway is done; the client may still be sending
                else:
                    _shut(sock)                   # the channel died without an end of file: abort the client
                return
            sock.sendall(data)
    except Exception:  # noqa: BLE001 — the client went away (OSError) or the channel died
        chan.close()
        _shut(sock)
