"""The SSH servers of scripts/sshd-local.sh, checked with OpenSSH's own client and with paramiko's parts.

What the remote tests stand on: both servers admit the generated key, ProxyJump reaches the login server
through the jump server (whose log shows the forward), known_hosts vouches for both under the names OpenSSH
and paramiko look up, SFTP works, the host-key fixtures make OpenSSH refuse, and killing a connection from
the server side drops exactly that connection while the server keeps listening.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

pytestmark = pytest.mark.ssh

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sshd-local.sh"


def _ssh(config: Path, alias: str, *command: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """OpenSSH's client, configured only by `config`, running `command` on `alias`."""
    return subprocess.run(["ssh", "-F", str(config), alias, *command], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout_s)


def _wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _paramiko_transport(sshd) -> paramiko.Transport:
    """An authenticated paramiko connection straight to the login server, its host key checked."""
    known = paramiko.HostKeys(str(sshd.known_hosts))
    transport = paramiko.Transport((sshd.host, sshd.login_port))
    transport.connect(hostkey=known.lookup(f"[{sshd.host}]:{sshd.login_port}")["ssh-ed25519"], username=sshd.user,
                      pkey=paramiko.Ed25519Key.from_private_key_file(str(sshd.client_key)))
    return transport


@pytest.mark.parametrize(("alias", "server"), [("scepsy-login", "login"), ("scepsy-jump", "jump")])
def test_each_server_admits_the_client_key_on_its_port(sshd, alias, server):
    done = _ssh(sshd.ssh_config, alias, "id -un; echo $SSH_CONNECTION")
    assert done.returncode == 0, done.stderr
    user, connection = done.stdout.splitlines()
    assert user == sshd.user
    # SSH_CONNECTION: client address, client port, server address, server port
    assert connection.split()[2:] == [sshd.host, str(sshd.port(server))]


def test_proxyjump_reaches_the_login_server_through_the_jump_server(sshd):
    since = sshd.log_offset("jump")
    done = _ssh(sshd.ssh_config, sshd.via_jump_alias, "echo $SSH_CONNECTION")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[2:] == [sshd.host, str(sshd.login_port)]
    forwards = [ln for ln in sshd.log_text("jump", since=since).splitlines() if "server_request_direct_tcpip" in ln]
    # the jump server opened the forward to the login server: the hop went through it, not around it
    assert any(ln.endswith(f"target {sshd.host} port {sshd.login_port}") for ln in forwards), forwards


def test_known_hosts_vouches_for_each_server_under_the_names_clients_look_up(sshd):
    known = paramiko.HostKeys(str(sshd.known_hosts))
    for server, names in [("login", [sshd.host, sshd.login_alias, sshd.via_jump_alias]),
                          ("jump", [sshd.host, sshd.jump_alias])]:
        transport = paramiko.Transport((sshd.host, sshd.port(server)))
        try:
            transport.start_client(timeout=10)
            offered = transport.get_remote_server_key()
        finally:
            transport.close()
        assert offered.fingerprint == sshd.fingerprint(server)
        for name in names:
            # paramiko and OpenSSH both look a host on a port other than 22 up as "[name]:port"
            entry = known.lookup(f"[{name}]:{sshd.port(server)}")
            assert entry is not None, f"no known_hosts entry for [{name}]:{sshd.port(server)}"
            assert entry[offered.get_name()] == offered


def test_sftp_works_on_the_login_server(sshd, tmp_path):
    local = tmp_path / "workflow.yaml"
    local.write_text("name: copied over sftp\n")
    transport = _paramiko_transport(sshd)
    try:
        sftp = paramiko.SFTPClient.from_transport(transport)
        sftp.put(str(local), str(tmp_path / "copied.yaml"))  # the "remote" is this host
        sftp.close()
    finally:
        transport.close()
    assert (tmp_path / "copied.yaml").read_text() == "name: copied over sftp\n"


def test_openssh_refuses_a_login_server_missing_from_known_hosts(unknown_host_key, sshd):
    done = _ssh(unknown_host_key.ssh_config, sshd.login_alias, "true")
    assert done.returncode == 255
    assert f"No ED25519 host key is known for [{sshd.host}]:{sshd.login_port}" in done.stderr
    assert unknown_host_key.listed_fingerprint is None
    # the jump server is still known: through it, only the last hop is refused
    assert _ssh(unknown_host_key.ssh_config, sshd.jump_alias, "true").returncode == 0


def test_openssh_refuses_a_login_server_whose_host_key_changed(changed_host_key, sshd):
    done = _ssh(changed_host_key.ssh_config, sshd.via_jump_alias, "true")
    assert done.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in done.stderr
    assert changed_host_key.fingerprint in done.stderr
    assert changed_host_key.listed_fingerprint not in (None, changed_host_key.fingerprint)


def test_kill_connections_drops_only_the_connection_asked_for(sshd):
    kept, doomed = _paramiko_transport(sshd), _paramiko_transport(sshd)
    try:
        doomed_port = doomed.sock.getsockname()[1]
        listener = sshd.listener_pid("login")
        killed = sshd.kill_connections("login", client_port=doomed_port)
        assert [c.client_port for c in killed] == [doomed_port]
        assert _wait_for(lambda: not doomed.is_active()), "the client never saw its connection drop"
        assert kept.is_active()
        channel = kept.open_session()  # and it still carries channels
        channel.exec_command("true")
        assert channel.recv_exit_status() == 0
        assert sshd.listener_pid("login") == listener
        assert doomed_port not in {c.client_port for c in sshd.connections("login")}
    finally:
        kept.close()
        doomed.close()


def test_kill_connections_drops_an_openssh_client_and_the_server_takes_the_next(sshd):
    since = sshd.log_offset("login")  # client ports recur, so only this test's log lines count
    client = subprocess.Popen(["ssh", "-F", str(sshd.ssh_config), "-N", sshd.login_alias],
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def logged_in() -> bool:
            ports = {c.client_port for c in sshd.connections("login")} - {None}
            log = sshd.log_text("login", since=since)
            return any(f"Accepted publickey for {sshd.user} from {sshd.host} port {p} " in log for p in ports)

        # killed before it authenticates, the client would only say "Connection closed by …"
        assert _wait_for(logged_in, timeout_s=10)
        sshd.kill_connections("login")
        assert client.wait(timeout=10) == 255
        assert "closed by remote host" in client.stderr.read()
    finally:
        client.kill()
        client.wait()
    assert _ssh(sshd.ssh_config, sshd.login_alias, "true").returncode == 0


def test_kill_connections_refuses_to_kill_nothing(sshd):
    with pytest.raises(LookupError) as raised:
        sshd.kill_connections("jump", client_port=1)
    assert "no connection from client port 1" in str(raised.value)


def test_the_session_points_scepsy_ssh_config_at_the_servers(sshd):
    assert os.environ["SCEPSY_SSH_CONFIG"] == str(sshd.ssh_config)
    config = paramiko.SSHConfig.from_path(os.environ["SCEPSY_SSH_CONFIG"]).lookup(sshd.via_jump_alias)
    assert (config["hostname"], int(config["port"]), config["proxyjump"]) == (sshd.host, sshd.login_port,
                                                                               sshd.jump_alias)
    assert config["identityfile"] == [str(sshd.client_key)]


def test_start_again_keeps_the_running_servers_and_env_names_them(sshd):
    listeners = (sshd.listener_pid("login"), sshd.listener_pid("jump"))
    started = subprocess.run(["bash", str(_SCRIPT), "start"], capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    assert "already up" in started.stdout
    assert (sshd.listener_pid("login"), sshd.listener_pid("jump")) == listeners
    env = subprocess.run(["bash", str(_SCRIPT), "env"], capture_output=True, text=True, timeout=30)
    assert env.returncode == 0, env.stderr
    assert f"export SCEPSY_SSH_CONFIG={sshd.ssh_config}" in env.stdout.splitlines()
    assert f"export SCEPSY_SSHD_LOGIN_PORT={sshd.login_port}" in env.stdout.splitlines()
