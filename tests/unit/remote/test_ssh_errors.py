"""SSH failures that need no SSH server, translated at the boundary (remote.ssh): a refused port, a port
that speaks no SSH, a name that does not resolve; each a RemoteError (exit 255) naming the host and the
fix, within its timeout."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from scepsy_hpc.remote.ssh import RemoteError, connect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_port_is_said_as_such(tmp_path):
    port = _free_port()
    with pytest.raises(RemoteError, match="refused the connection") as e:
        connect(f"127.0.0.1:{port}", config_file=str(_empty(tmp_path)), timeout=3)
    assert e.value.exit_code == 255 and str(port) in str(e.value)


def test_a_port_that_speaks_no_ssh_times_out_with_the_fix(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    held = []
    threading.Thread(target=lambda: held.append(srv.accept()), daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(RemoteError, match="no SSH server answered within 1 s"):
            connect(f"127.0.0.1:{srv.getsockname()[1]}", config_file=str(_empty(tmp_path)), timeout=1)
        assert time.monotonic() - t0 < 10
    finally:
        srv.close()


def test_a_name_that_does_not_resolve_names_the_config(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text("Host login\n  HostName no-such-host.invalid\n  ConnectTimeout 3\n")
    with pytest.raises(RemoteError, match="cannot resolve host name 'no-such-host.invalid'") as e:
        connect("login", config_file=str(cfg))
    assert str(cfg) in str(e.value)


def _empty(tmp_path):
    p = tmp_path / "empty_config"
    p.write_text("")
    return p
