"""What the node agent exposes to other users of a node: the address its engines bind (`bind_address`) and the
lock it picks ports under (`port_lock_path`: this user's own, so another user can neither hold nor plant it)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from scepsy_hpc.backend.agent import BIND_ENV, PORT_LOCK_NAME, bind_address, port_lock, port_lock_path

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux file semantics")
NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
                                reason="acting as another user needs root and setpriv")


def _resolver(table: dict[str, list[str]]):
    def resolve(name, port, family, kind):
        if name not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(family, kind, 6, "", (a, 0)) for a in table[name]]
    return resolve


def test_the_bind_address_is_the_nodes_own_never_every_interface(monkeypatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "host-a")
    always = lambda addr: True  # noqa: E731
    # an override wins (a site's separate cluster network; the local backend's job sets loopback)
    assert bind_address("n1", {BIND_ENV: "10.9.0.4"}, _resolver({}), always) == "10.9.0.4"
    # the node's Slurm name first, a routable address before a loopback one (Debian: host name → 127.0.1.1)
    table = {"n1": ["127.0.1.1", "10.0.0.7"], "host-a": ["192.168.1.5"]}
    assert bind_address("n1", {}, _resolver(table), always) == "10.0.0.7"
    # a node name that resolves to nothing (the local Slurm's node01…): the host name's address
    assert bind_address("node01", {}, _resolver(table), always) == "192.168.1.5"
    # only loopback known: loopback; nothing at all: 127.0.0.1 — never 0.0.0.0
    assert bind_address("n1", {}, _resolver({"n1": ["127.0.1.1"]}), always) == "127.0.1.1"
    assert bind_address("n1", {}, _resolver({}), always) == "127.0.0.1"
    # an address this host does not have (a name that resolves elsewhere) is skipped
    assert bind_address("n1", {}, _resolver(table), lambda a: a != "10.0.0.7") == "192.168.1.5"


def test_the_real_bind_address_is_one_of_this_hosts() -> None:
    addr = bind_address(socket.gethostname(), {})
    assert addr != "0.0.0.0"
    with socket.socket() as s:
        s.bind((addr, 0))


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory like /tmp (world-writable, sticky) that another user can reach."""
    path = Path(tempfile.mkdtemp(prefix="scepsy-shared-tmp-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/usr/bin/python3",
                           "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=10)


def test_the_port_lock_is_in_a_directory_of_this_users_own(tmp_path: Path, shared_tmp: Path) -> None:
    session = tmp_path / "session"
    session.mkdir()
    lock = port_lock_path({}, session, shared_tmp)
    assert lock == shared_tmp / f"scepsy-{os.getuid()}" / PORT_LOCK_NAME
    st = os.lstat(lock.parent)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    with port_lock(lock):
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert port_lock_path({}, session, shared_tmp) == lock   # the second agent finds the same one
    # a private XDG_RUNTIME_DIR comes first; one that is not ours (or not private) is passed over
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    assert port_lock_path({"XDG_RUNTIME_DIR": str(runtime)}, session, shared_tmp) == runtime / PORT_LOCK_NAME
    runtime.chmod(0o755)
    assert port_lock_path({"XDG_RUNTIME_DIR": str(runtime)}, session, shared_tmp) == lock
    assert port_lock_path({"XDG_RUNTIME_DIR": "relative/dir"}, session, shared_tmp) == lock


@needs_root
def test_another_user_can_neither_hold_our_lock_nor_plant_its_directory(tmp_path: Path, shared_tmp: Path) -> None:
    session = tmp_path / "session"
    session.mkdir()
    lock = port_lock_path({}, session, shared_tmp)
    with port_lock(lock):
        pass
    # the old shared /tmp lock could be opened and held by anyone: ours cannot even be opened
    got = _as_nobody(f"""
        import fcntl, os
        try:
            fd = os.open({str(lock)!r}, os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("held")
        except PermissionError:
            print("denied")
    """)
    assert got.stdout.strip() == "denied", got.stderr
    # another user's agents lock in their own directory, not ours
    got = _as_nobody(f"import os; print(os.path.join({str(shared_tmp)!r}, 'scepsy-%d' % os.getuid()))")
    assert Path(got.stdout.strip()) != lock.parent
    # a directory (or a symlink) someone else made under our name first is not trusted: the session's is used
    for plant in ("os.mkdir(p, 0o777); os.chmod(p, 0o777)", "os.symlink('/tmp', p)"):
        other = Path(tempfile.mkdtemp(prefix="scepsy-shared-tmp-", dir="/tmp"))
        other.chmod(0o1777)
        try:
            target = other / f"scepsy-{os.getuid()}"
            got = _as_nobody(f"import os; p = {str(target)!r}; {plant}")
            assert got.returncode == 0 and os.path.lexists(target), got.stderr
            assert port_lock_path({}, session, other) == session / PORT_LOCK_NAME
        finally:
            shutil.rmtree(other, ignore_errors=True)


def test_the_lock_is_never_opened_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "lock").symlink_to(target)
    from scepsy_hpc.errors import EngineError

    with pytest.raises(EngineError, match="cannot open the port lock"):
        with port_lock(tmp_path / "lock"):
            pass
    assert not target.exists()
