"""`scepsy --remote HOST …` through a real OpenSSH server (scripts/sshd-local.sh): the login node is
this machine reached over SSH, its scepsy this checkout's, with a state dir of the test's own.

Covered: a deployment's whole life from a workstation (daemon start, up with a local workflow file
copied by SFTP, ls, status, down), --json and exit statuses kept, ProxyJump through a second sshd,
unknown and changed host keys refused with their fingerprints (nothing run), keys refused, a remote
without scepsy, and Ctrl-C reaching the remote command as SIGINT."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ssh

ROOT = Path(__file__).resolve().parents[2]
SCEPSY = str(Path(sys.executable).parent / "scepsy")


def remote(host: str, *args: str, scepsy: str, env: dict[str, str] | None = None, timeout: float = 120,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scepsy_hpc.cli", "--remote", host, "--remote-scepsy", scepsy, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "remote-state"
    d.mkdir(mode=0o700)
    return d


def scepsy_with(state: Path) -> str:
    """How the 'login node' runs scepsy: this checkout's, on the test's state dir (shell words)."""
    return f"env SCEPSY_STATE_DIR={shlex.quote(str(state))} {shlex.quote(SCEPSY)}"


def test_a_deployment_from_a_workstation_up_ls_status_down(sshd, state, tmp_path):
    host, cmd = sshd.login_alias, scepsy_with(state)
    work = tmp_path / "laptop"
    work.mkdir()
    (work / "my_workflow.yaml").write_text((ROOT / "tests" / "data" / "small_rag.yaml").read_text())
    done = remote(host, "daemon", "start", scepsy=cmd)
    assert done.returncode == 0, done.stderr
    try:
        up = remote(host, "up", "my_workflow.yaml", "--detach", "--time-scale", "0.05", "--json", scepsy=cmd, cwd=work,
                    timeout=240)
        assert up.returncode == 0, up.stderr
        doc = json.loads(up.stdout)      # one document, as locally
        assert doc["name"] == "my_workflow" and doc["base_url"].endswith("/d/my_workflow/v1")
        # the file went to ~/.scepsy/uploads/SHA/NAME there, its name kept (it names the deployment)
        uploads = list((Path.home() / ".scepsy" / "uploads").glob("*/my_workflow.yaml"))
        assert uploads and uploads[0].stat().st_mode & 0o077 == 0
        ls = remote(host, "ls", "--json", scepsy=cmd)
        assert ls.returncode == 0, ls.stderr
        assert [d["name"] for d in json.loads(ls.stdout)["deployments"]] == ["my_workflow"]
        deadline = time.monotonic() + 180
        while True:
            st = remote(host, "status", "my_workflow", "--json", scepsy=cmd)
            if st.returncode == 0 and json.loads(st.stdout)["state"] == "serving":
                break
            assert time.monotonic() < deadline, st.stdout[-2000:] + st.stderr[-2000:]
            time.sleep(2)
        human = remote(host, "ls", scepsy=cmd)
        assert human.returncode == 0 and "my_workflow" in human.stdout and "serving" in human.stdout
        down = remote(host, "down", "my_workflow", scepsy=cmd, timeout=180)
        assert down.returncode == 0, down.stderr
        st = remote(host, "status", "my_workflow", "--json", scepsy=cmd)
        assert json.loads(st.stdout)["state"] in ("stopped", "down")
    finally:
        remote(host, "daemon", "stop", "--all", scepsy=cmd, timeout=120)


def test_json_errors_and_exit_statuses_are_the_remote_commands(sshd, state):
    cmd = scepsy_with(state)
    got = remote(sshd.login_alias, "status", "nope", "--json", scepsy=cmd)
    assert got.returncode == 1
    assert json.loads(got.stdout)["error"]["type"] == "DaemonNotRunning"
    got = remote(sshd.login_alias, "validate", "no_such_file.yaml", scepsy=cmd)
    assert got.returncode == 2 and "no_such_file" in got.stderr


def test_proxyjump_goes_through_the_jump_host(sshd, state, tmp_path):
    wf = tmp_path / "wf.yaml"
    wf.write_text((ROOT / "tests" / "data" / "small_rag.yaml").read_text())
    since = sshd.log_offset("jump")
    got = remote(sshd.via_jump_alias, "validate", str(wf), "--json", scepsy=scepsy_with(state))
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)
    log = sshd.log_text("jump", since=since)
    assert "direct-tcpip" in log and str(sshd.login_port) in log, log[-2000:]


def test_an_unknown_host_key_is_refused_with_its_fingerprint(sshd, state, unknown_host_key):
    since = sshd.log_offset("login")
    got = remote(sshd.login_alias, "ls", "--json", scepsy=scepsy_with(state),
                 env={"SCEPSY_SSH_CONFIG": str(unknown_host_key.ssh_config)})
    assert got.returncode == 255
    err = json.loads(got.stdout)["error"]
    assert err["type"] == "HostKeyError" and unknown_host_key.fingerprint in err["message"]
    assert "not known" in err["message"] and "ssh-keyscan" in err["message"]
    assert "Accepted publickey" not in sshd.log_text("login", since=since)   # nothing was sent


def test_a_changed_host_key_is_refused_with_both_fingerprints(sshd, state, changed_host_key):
    got = remote(sshd.login_alias, "ls", scepsy=scepsy_with(state),
                 env={"SCEPSY_SSH_CONFIG": str(changed_host_key.ssh_config)})
    assert got.returncode == 255
    assert "CHANGED" in got.stderr and changed_host_key.fingerprint in got.stderr
    assert changed_host_key.listed_fingerprint in got.stderr and "ssh-keygen -R" in got.stderr
    # through a jump host, the last hop's key is checked too
    got = remote(sshd.via_jump_alias, "ls", scepsy=scepsy_with(state),
                 env={"SCEPSY_SSH_CONFIG": str(changed_host_key.ssh_config)})
    assert got.returncode == 255 and "CHANGED" in got.stderr


def test_keys_the_server_refuses_and_a_missing_scepsy_are_named(sshd, state, tmp_path):
    import paramiko

    other = tmp_path / "other_key"
    paramiko.Ed25519Key  # noqa: B018 — present in every paramiko we support
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    cfg = tmp_path / "ssh_config"
    cfg.write_text(sshd.ssh_config.read_text().replace(str(sshd.client_key), str(other)))
    got = remote(sshd.login_alias, "ls", scepsy=scepsy_with(state), env={"SCEPSY_SSH_CONFIG": str(cfg)})
    assert got.returncode == 255 and "refused user" in got.stderr and str(other) in got.stderr
    got = remote(sshd.login_alias, "ls", scepsy="/nonexistent/bin/scepsy")
    assert got.returncode == 255 and "was not found there" in got.stderr and "--remote-scepsy" in got.stderr


def _default_sigint() -> None:
    """In the child: SIGINT as a terminal gives it (a test run started in the background, `cmd &`, inherits
    it ignored, and a scepsy started with it ignored never sees the Ctrl-C this test sends)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_reaches_the_remote_command_as_sigint(sshd, tmp_path):
    """The first Ctrl-C here is SIGINT there; the command's own handling runs and its output still arrives."""
    prog = tmp_path / "fake_scepsy.py"
    prog.write_text("import sys, time\ntry:\n    print('started', flush=True)\n    time.sleep(60)\n"
                    "except KeyboardInterrupt:\n    print('stopping as asked', flush=True)\n    sys.exit(130)\n")
    p = subprocess.Popen([sys.executable, "-m", "scepsy_hpc.cli", "--remote", sshd.login_alias, "--remote-scepsy",
                          f"{shlex.quote(sys.executable)} {shlex.quote(str(prog))}", "ls"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        assert p.stdout.readline() == "started\n"
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        assert "stopping as asked" in out and p.returncode == 130, err
        assert time.monotonic() - t0 < 15
    finally:
        if p.poll() is None:
            p.kill()
    # a command that dies of the SIGINT (Python re-raises it) still reads as Ctrl-C's 130 here
    prog.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-m", "scepsy_hpc.cli", "--remote", sshd.login_alias, "--remote-scepsy",
                          f"{shlex.quote(sys.executable)} {shlex.quote(str(prog))}", "ls"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        assert p.stdout.readline() == "started\n"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 130 and "KeyboardInterrupt" in err, err
    finally:
        if p.poll() is None:
            p.kill()
