"""The tunnel's own seam, without sshd: `Tunnel` over a fake SSH connection whose channels are plain TCP
connections to a local server (what sshd's direct-tcpip does), and `find_gateway` over a fake `exec`.
What these pin: bytes both ways with half-closes carried through, the cap on connections, a local connection
waiting for a lost connection to come back (or closed after the bounded wait), a host-key error on
reconnection ending the tunnel, and how the remote `status --json` is read. tests/remote/test_tunnel.py
runs the real thing through OpenSSH's sshd."""

from __future__ import annotations

import json
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest

from scepsy_hpc.errors import ScepsyError, SpecError
from scepsy_hpc.remote.ssh import HostKeyError, RemoteError
from scepsy_hpc.remote.tunnel import Gateway, Tunnel, check_bind, find_gateway, local_url


class FakeChannel:
    """A paramiko Channel's surface, over a TCP connection to the destination."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.eof_received = False
        self.closed = False

    def recv(self, n: int) -> bytes:
        try:
            data = self.sock.recv(n)
        except OSError:
            return b""
        if not data and not self.closed:
            self.eof_received = True
        return data

    def sendall(self, data: bytes) -> None:
        if self.closed:
            raise OSError("Socket is closed")
        self.sock.sendall(data)

    def shutdown_write(self) -> None:
        if not self.closed:
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


class FakeTransport:
    def __init__(self) -> None:
        self.active = True
        self.answers = True      # False: a path that died silently (keepalives go out, nothing comes back)
        self.channels: list[FakeChannel] = []
        self.sock = None

    def is_active(self) -> bool:
        return self.active

    def get_exception(self) -> Exception | None:
        return None

    def global_request(self, kind: str, wait: bool = True) -> None:
        while not self.answers and self.active:   # paramiko's wait: until answered or the transport ends
            time.sleep(0.01)
        return None

    def open_channel(self, kind: str, dest: tuple[str, int], src: tuple[str, int], **_: Any) -> FakeChannel:
        if not self.active:
            raise EOFError("transport closed")
        assert kind == "direct-tcpip"
        chan = FakeChannel(socket.create_connection(dest, timeout=5))
        chan.sock.settimeout(None)
        self.channels.append(chan)
        return chan


class FakeConnection:
    """`ssh.Connection`'s surface: alias, transport, alive, close, exec (a canned answer)."""

    def __init__(self, answer: tuple[int, bytes, bytes] = (0, b"", b"")) -> None:
        self.target = SimpleNamespace(alias="login")
        self.transport = FakeTransport()
        self.answer = answer
        self.commands: list[str] = []

    def alive(self) -> bool:
        return self.transport.active

    def drop(self) -> None:
        """The server went away: the transport dies, and every channel with it."""
        self.transport.active = False
        for c in self.transport.channels:
            c.close()

    def close(self) -> None:
        self.drop()

    def exec(self, command: str, *, out: Any = None, err: Any = None) -> int:
        self.commands.append(command)
        rc, stdout, stderr = self.answer
        out.write(stdout)
        err.write(stderr)
        return rc


@pytest.fixture
def upper_server() -> Iterator[tuple[str, int]]:
    """A server that reads each connection to its end, answers it upper-cased, then closes."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(data.upper())

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield lsock.getsockname()[:2]
    stop.set()
    t.join()
    lsock.close()


class Running:
    """A Tunnel started and supervised in a thread; what it said, and how run() ended."""

    def __init__(self, tunnel: Tunnel, said: list[str]) -> None:
        self.tunnel, self.said = tunnel, said
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.address = tunnel.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.tunnel.run(self.stop)
        except BaseException as e:  # noqa: BLE001 — the test looks at it
            self.error = e

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)

    def wait_said(self, text: str, timeout_s: float = 5.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.said):
                if text in line:
                    return line
            time.sleep(0.02)
        raise AssertionError(f"never said {text!r}; said {self.said}")


@pytest.fixture
def tunnel_of(upper_server: tuple[str, int]) -> Iterator[Callable[..., Running]]:
    made: list[Running] = []

    def make(connect: Callable[[], Any], **kw: Any) -> Running:
        said: list[str] = []
        kw.setdefault("delays", lambda: iter([0.05] * 1000))
        r = Running(Tunnel(connect, lambda conn: upper_server, say=said.append, **kw), said)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def roundtrip(address: tuple[str, int], data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send `data`, close the sending side, read the answer to its end (b"" when closed, or reset, unanswered)."""
    with socket.create_connection(address, timeout=timeout_s) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:   # closed with our bytes unread: the kernel resets
            assert not got
    return got


def test_bytes_go_both_ways_and_half_closes_reach_the_far_end(tunnel_of: Callable[..., Running]) -> None:
    conn = FakeConnection()
    r = tunnel_of(lambda: conn)
    payload = bytes(range(97, 123)) * 40_000    # ~1 MiB: many chunks each way
    answers: list[bytes] = []
    threads = [threading.Thread(target=lambda: answers.append(roundtrip(r.address, payload))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert answers == [payload.upper()] * 8
    assert r.tunnel.forwarded == 8 and len(conn.transport.channels) == 8
    deadline = time.monotonic() + 5
    while r.tunnel.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert r.tunnel.active == 0   # every forwarded connection let go once both ends closed


def test_connections_over_the_cap_are_closed_at_once_and_said(tunnel_of: Callable[..., Running]) -> None:
    r = tunnel_of(lambda: FakeConnection(), max_conns=2)
    held = [socket.create_connection(r.address, timeout=5) for _ in range(2)]   # the server waits for their end
    deadline = time.monotonic() + 5
    while r.tunnel.forwarded < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    with socket.create_connection(r.address, timeout=5) as third:
        assert third.recv(1) == b""      # closed without a byte
    assert "2 forwarded connections are open (the limit); closed 1 new one(s)" in r.wait_said("(the limit)")
    for s in held:
        s.close()
    deadline = time.monotonic() + 5
    while r.tunnel.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert roundtrip(r.address, b"after") == b"AFTER"   # below the cap again


def test_a_connection_made_while_the_ssh_connection_is_down_waits_for_it(tunnel_of: Callable[..., Running]) -> None:
    first, second = FakeConnection(), FakeConnection()
    gate = threading.Event()
    calls: list[int] = []

    def connect() -> FakeConnection:
        calls.append(1)
        if len(calls) == 1:
            return first
        gate.wait(10)
        if len(calls) == 2:
            raise RemoteError("login: 127.0.0.1:22 refused the connection")
        return second

    r = tunnel_of(connect)
    assert roundtrip(r.address, b"one") == b"ONE"
    first.drop()
    assert "the connection to login was lost (the server closed it); reconnecting in 0.1 s" in r.wait_said("was lost")
    answer: list[bytes] = []
    waiting = threading.Thread(target=lambda: answer.append(roundtrip(r.address, b"while down")))
    waiting.start()
    time.sleep(0.3)
    assert not answer and waiting.is_alive()   # held, not refused
    gate.set()
    waiting.join(10)
    assert answer == [b"WHILE DOWN"]
    assert "tunnel: attempt 1 failed (login: 127.0.0.1:22 refused the connection); retrying in 0.1 s" in r.said
    assert r.wait_said("re-established") == "tunnel: re-established (attempt 2)"
    assert r.address == r.tunnel.address and r.tunnel.reconnects == 1 and len(second.transport.channels) == 1


def test_a_waiting_connection_is_closed_after_the_bounded_wait(tunnel_of: Callable[..., Running]) -> None:
    first = FakeConnection()
    calls: list[int] = []

    def connect() -> FakeConnection:
        calls.append(1)
        if len(calls) == 1:
            return first
        raise RemoteError("login: no answer")

    r = tunnel_of(connect, pending_wait_s=0.4)
    first.drop()
    r.wait_said("was lost")
    t0 = time.monotonic()
    assert roundtrip(r.address, b"x") == b""
    assert 0.3 < time.monotonic() - t0 < 3.0
    assert r.wait_said("waited") == ("tunnel: a local connection waited 0.4 s for the connection to login to come "
                                     "back; closed it")


def test_a_silently_dead_connection_is_noticed_by_its_unanswered_keepalive(tunnel_of: Callable[..., Running]) -> None:
    first, second = FakeConnection(), FakeConnection()
    conns = iter([first, second])
    r = tunnel_of(lambda: next(conns), probe_s=0.1, probe_timeout_s=0.5)
    time.sleep(0.4)
    assert not any("lost" in s for s in r.said)   # answered keepalives: nothing to say
    first.transport.answers = False               # still "active" to paramiko, but nothing comes back
    line = r.wait_said("was lost")
    assert line == "tunnel: the connection to login was lost (no answer to a keepalive in 0.5 s); reconnecting in 0.1 s"
    r.wait_said("re-established (attempt 1)")
    assert not first.transport.active              # the dead one was closed
    assert roundtrip(r.address, b"again") == b"AGAIN" and len(second.transport.channels) == 1


def test_a_host_key_error_on_reconnection_ends_the_tunnel(tunnel_of: Callable[..., Running]) -> None:
    first = FakeConnection()
    calls: list[int] = []

    def connect() -> FakeConnection:
        calls.append(1)
        if len(calls) == 1:
            return first
        raise HostKeyError("login: the host key of [127.0.0.1]:2222 has CHANGED")

    r = tunnel_of(connect)
    first.drop()
    r.thread.join(5)
    assert isinstance(r.error, HostKeyError) and "CHANGED" in str(r.error)
    assert len(calls) == 2                           # not retried
    with pytest.raises(ConnectionRefusedError):      # the listener is closed
        socket.create_connection(r.address, timeout=2)


def _status(state: str = "serving", error: str | None = None) -> bytes:
    return json.dumps({"name": "dep", "state": state, "gateway_url": "http://127.0.0.1:4321",
                       "base_url": "http://127.0.0.1:4321/d/dep/v1", "error": error, "instances": []}).encode()


def test_find_gateway_reads_the_remote_status() -> None:
    conn = FakeConnection((0, _status(), b""))
    gw = find_gateway(conn, "dep", "env X=1 /opt/scepsy")   # type: ignore[arg-type]
    assert gw == Gateway("dep", "serving", "http://127.0.0.1:4321", "http://127.0.0.1:4321/d/dep/v1")
    assert (gw.address, gw.path) == (("127.0.0.1", 4321), "/d/dep/v1")
    assert conn.commands == ["env X=1 /opt/scepsy status dep --json"]
    find_gateway(conn, "a b;rm", "scepsy")   # type: ignore[arg-type]
    assert conn.commands[-1] == "scepsy status 'a b;rm' --json"


def test_find_gateway_refuses_an_unknown_or_idle_deployment_and_a_missing_scepsy() -> None:
    unknown = {"error": {"type": "SpecError", "message": "no deployment 'x' here (/s); deployments: dep", "exit_code": 2}}
    with pytest.raises(SpecError) as e1:
        find_gateway(FakeConnection((2, json.dumps(unknown).encode(), b"")), "x")   # type: ignore[arg-type]
    assert str(e1.value) == "on login: no deployment 'x' here (/s); deployments: dep" and e1.value.exit_code == 2

    with pytest.raises(SpecError) as e2:
        find_gateway(FakeConnection((1, _status("failed", "engine died"), b"")), "dep")   # type: ignore[arg-type]
    assert "deployment 'dep' on login is failed, not serving: engine died" in str(e2.value)

    gone = {"error": {"type": "DaemonNotRunning", "message": "no scepsy daemon runs for /s", "exit_code": 1}}
    with pytest.raises(ScepsyError) as e3:
        find_gateway(FakeConnection((1, json.dumps(gone).encode(), b"")), "dep")   # type: ignore[arg-type]
    assert str(e3.value) == "on login: no scepsy daemon runs for /s" and e3.value.exit_code == 1

    with pytest.raises(RemoteError) as e4:
        find_gateway(FakeConnection((127, b"", b"bash: scepsy: command not found\n")), "dep")   # type: ignore[arg-type]
    assert "login: `scepsy` was not found there (bash: scepsy: command not found): install scepsy" in str(e4.value)
    assert "--remote-scepsy PATH or `hosts: {login: {scepsy: PATH}}`" in str(e4.value) and e4.value.exit_code == 255


def test_bind_addresses_and_local_urls() -> None:
    assert check_bind("127.0.0.1") and check_bind("::1") and check_bind("localhost") and check_bind("127.0.0.2")
    assert not check_bind("0.0.0.0") and not check_bind("192.168.1.5")
    with pytest.raises(SpecError) as e:
        check_bind("my-laptop")
    assert "--bind 'my-laptop': give an IP address" in str(e.value)
    assert local_url(("127.0.0.1", 8000), "/d/x/v1") == "http://127.0.0.1:8000/d/x/v1"
    assert local_url(("0.0.0.0", 8000), "/d/x/v1") == "http://127.0.0.1:8000/d/x/v1"
    assert local_url(("::1", 8000), "/v1") == "http://[::1]:8000/v1"


def test_a_busy_local_port_is_refused_and_the_connection_closed(upper_server: tuple[str, int]) -> None:
    conn = FakeConnection()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        t = Tunnel(lambda: conn, lambda c: upper_server, bind=("127.0.0.1", port), say=lambda line: None)
        with pytest.raises(SpecError) as e:
            t.start()
    assert str(e.value) == (f"tunnel: cannot listen on 127.0.0.1:{port}: Address already in use; choose another "
                            f"--local-port (0: any free one)")
    assert not conn.alive()


def test_tunnel_without_remote_says_how(capsys: pytest.CaptureFixture[str]) -> None:
    from scepsy_hpc.cli import main

    assert main(["tunnel", "dep"]) == 2
    assert "tunnel dep: give the login node with --remote HOST" in capsys.readouterr().err
