"""`scepsy --remote`'s local half (remote.run): which arguments are files, the client config, which
scepsy runs there, and the sh wrapper that turns a closed stdin into SIGINT (run here with a local
sh: the same program sshd runs). The SSH half is tested through a real sshd in tests/remote."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scepsy_hpc.cli import build_parser
from scepsy_hpc.errors import SpecError
from scepsy_hpc.remote import run as rr
from scepsy_hpc.remote.ssh import RemoteError, resolve


def test_files_on_the_command_line_are_found_and_names_are_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wf.yaml").write_text("name: x\n")
    (tmp_path / "plan.yaml").write_text("x: 1\n")
    (tmp_path / "mydep").write_text("a file named like a deployment\n")
    argv = ["up", "wf.yaml", "--name", "mydep", "--cluster=plan.yaml", "rag_rerank", str(tmp_path / "plan.yaml"),
            "--detach", "missing.yaml"]
    got = rr.local_files(argv)
    assert got == [(1, "", "wf.yaml"), (4, "--cluster=", "plan.yaml"), (6, "", str(tmp_path / "plan.yaml"))]


def test_client_config_names_the_file_and_the_fix(tmp_path, monkeypatch):
    p = tmp_path / "remote.yaml"
    monkeypatch.setenv(rr.CLIENT_CONFIG_ENV, str(p))
    with pytest.raises(SpecError, match="no such file"):
        rr.client_config()
    p.write_text("hosts:\n  login1: {scepsy: ~/venv/bin/scepsy}\n  '*': {scepsy: /opt/scepsy/bin/scepsy}\n")
    assert rr.remote_scepsy("login1") == "~/venv/bin/scepsy"
    assert rr.remote_scepsy("me@login1") == "~/venv/bin/scepsy"
    assert rr.remote_scepsy("login2") == "/opt/scepsy/bin/scepsy"
    assert rr.remote_scepsy("login1", "/x/scepsy") == "/x/scepsy"
    for bad, says in (("hosts: [a]\n", "mapping"), ("host: {}\n", "top level"), ("hosts:\n  a: {scepsy: 3}\n", "hosts.a"),
                      ("hosts: {a: {path: x}}\n", "hosts.a"), ("{{{\n", "not valid YAML")):
        p.write_text(bad)
        with pytest.raises(SpecError, match=says) as e:
            rr.client_config()
        assert str(p) in str(e.value)
    monkeypatch.delenv(rr.CLIENT_CONFIG_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))
    assert rr.client_config() == {} and rr.remote_scepsy("h") == "scepsy"


def test_host_specs_are_checked(tmp_path):
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host login\n  HostName 10.1.2.3\n  Port 2201\n  User alice\n  IdentityFile ~/.ssh/k\n"
                   "  ProxyJump bastion\nHost bastion\n  HostName bastion.example.org\n  User bob\n"
                   "Host loop\n  ProxyJump loop\n")
    t = resolve("login", config_file=str(cfg))
    assert (t.hostname, t.port, t.user) == ("10.1.2.3", 2201, "alice")
    assert t.identity_files == (str(Path.home() / ".ssh" / "k"),)
    assert [(j.alias, j.hostname, j.user, j.port) for j in t.jumps] == [("bastion", "bastion.example.org", "bob", 22)]
    assert t.host_key_name == "[10.1.2.3]:2201"
    t = resolve("carol@login:2222", config_file=str(cfg))
    assert (t.user, t.port) == ("carol", 2222)
    with pytest.raises(RemoteError, match="loop"):
        resolve("loop", config_file=str(cfg))
    for bad in ("-oProxyCommand=x", "a b", "host:port"):
        with pytest.raises(RemoteError):
            resolve(bad, config_file=str(cfg))
    with pytest.raises(RemoteError, match="no such ssh config"):
        resolve("login", config_file=str(tmp_path / "nope"))


def test_remote_options_parse_before_the_command():
    a = build_parser().parse_args(["--remote", "login1", "--remote-scepsy", "/x/scepsy", "ls", "--json"])
    assert (a.remote, a.remote_scepsy, a.command, a.json) == ("login1", "/x/scepsy", "ls", True)


def _default_sigint() -> None:
    """In the child: SIGINT as a login session gives it (a test run started in the background, `cmd &`,
    inherits it ignored, and a command started with it ignored never sees Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wrapped(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(["sh", "-c", rr.WRAPPER, "scepsy-remote", *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)


def test_the_wrapper_keeps_the_exit_status_and_output():
    """While the session's stdin stays open (as `--remote` keeps it), the command runs to its end."""
    p = _wrapped(sys.executable, "-c", "import sys, time; time.sleep(0.3); print('out'); print('err', file=sys.stderr); "
                 "sys.exit(3)")
    assert p.wait(timeout=20) == 3
    assert (p.stdout.read(), p.stderr.read()) == (b"out\n", b"err\n")
    p.stdin.close()
    p = _wrapped("/nonexistent/scepsy", "ls")
    assert p.wait(timeout=20) == rr.NOT_FOUND
    p.stdin.close()


def test_the_wrapper_turns_a_closed_stdin_into_sigint():
    """What a first Ctrl-C does over --remote: the session's stdin closes, the command gets SIGINT,
    handles it as locally (here: prints and exits 130), and its output still arrives."""
    # 'started' is printed inside the try: a SIGINT landing right after it (the wrapper sends one as soon as
    # stdin closes) would otherwise raise outside the handler
    code = ("import signal, sys, time\n"
            "try:\n    print('started', flush=True)\n    time.sleep(30)\n"
            "except KeyboardInterrupt:\n    print('interrupted', flush=True); sys.exit(130)\n")
    p = _wrapped(sys.executable, "-c", code)
    assert p.stdout.readline() == b"started\n"
    t0 = time.monotonic()
    p.stdin.close()
    out = p.stdout.read()
    p.wait(timeout=20)
    assert out == b"interrupted\n" and p.returncode == 130 and time.monotonic() - t0 < 10
    assert signal.SIGINT  # the wrapper sends INT, not TERM: scepsy's own Ctrl-C handling runs


def test_hints_run_under_remote_say_how_to_reach_the_deployment_from_the_workstation(monkeypatch):
    from scepsy_hpc.commands.serve import _key_hint

    url = "http://127.0.0.1:33315/d/mine/v1"
    monkeypatch.delenv("SCEPSY_REMOTE_CLIENT", raising=False)
    assert f"OPENAI_BASE_URL={url}" in _key_hint("mine", url, None)
    monkeypatch.setenv("SCEPSY_REMOTE_CLIENT", "login1")
    hint = _key_hint("mine", url, None)
    assert "scepsy --remote login1 tunnel mine --local-port 8000" in hint
    assert "scepsy --remote login1 keys show mine" in hint and "OPENAI_BASE_URL=http://127.0.0.1:8000/d/mine/v1" in hint
    assert rr.command_line("scepsy", ["ls"], "login1").startswith("env SCEPSY_REMOTE_CLIENT=login1 sh -c ")
