"""`python -m scepsy_hpc.gateway`: errors without traceback, serving until SIGTERM, trace flushed on exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from scepsy_hpc.engine.local import free_port
from scepsy_hpc.errors import SpecError
from scepsy_hpc.gateway import main
from scepsy_hpc.trace.records import read_trace

ROOT = Path(__file__).resolve().parents[3]


def test_bad_endpoints_file_exits_2_with_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ep = tmp_path / "ep.yaml"
    ep.write_text("llms:\n  a:\n    replicas: [http://h:1]\n    replicsa: []\n")
    assert main(["--endpoints", str(ep)]) == 2
    err = capsys.readouterr().err
    assert f"{ep}:4:" in err and "unknown key 'replicsa'" in err and "Traceback" not in err


def test_serves_until_sigterm_and_flushes_trace(tmp_path: Path) -> None:
    ep = tmp_path / "ep.yaml"
    ep.write_text("time_scale: 0.5\nllms:\n  a:\n    replicas: [http://127.0.0.1:9]\n")
    trace = tmp_path / "t.jsonl"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "scepsy_hpc.gateway", "--endpoints", str(ep), "--trace", str(trace),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with opener.open(f"http://127.0.0.1:{port}/v1/models", timeout=1) as r:
                    models = json.load(r)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "gateway did not come up"
                time.sleep(0.05)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/scepsy/v1/spans", method="POST",
                                     data=json.dumps({"span": "request", "event": "start", "request": "r"}).encode())
        opener.open(req, timeout=2).close()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/scepsy/v1/spans", method="POST",
                                     data=json.dumps({"span": "request", "event": "end", "request": "r"}).encode())
        opener.open(req, timeout=2).close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out.decode()
    assert [m["id"] for m in models["data"]] == ["a"]
    t = read_trace(trace)
    assert t.meta["time_scale"] == 0.5 and [s.request for s in t.spans] == ["r"]
    assert b"gateway serving a on http://127.0.0.1:" in out


def test_bad_time_scale_exits_2_and_debug_keeps_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ep = tmp_path / "ep.yaml"
    ep.write_text("llms:\n  a:\n    replicas: [http://h:1]\n")
    monkeypatch.delenv("SCEPSY_DEBUG", raising=False)
    assert main(["--endpoints", str(ep), "--time-scale", "-1"]) == 2
    assert capsys.readouterr().err == "--time-scale -1: the time scale must be a positive number\n"
    monkeypatch.setenv("SCEPSY_DEBUG", "1")
    with pytest.raises(SpecError) as exc:
        main(["--endpoints", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in str(exc.value)


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "gateway did not come up"
        time.sleep(0.05)


def test_pid_file_is_written_once_bound_and_removed_on_sigterm(tmp_path: Path) -> None:
    ep = tmp_path / "ep.yaml"
    ep.write_text("llms:\n  d/a:\n    aliases: [a]\n    replicas: [http://127.0.0.1:9]\n")
    pid_file = tmp_path / "run" / "gateway.pid"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "scepsy_hpc.gateway", "--endpoints", str(ep), "--port", str(port),
                             "--pid-file", str(pid_file)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        _wait_for(pid_file, proc)
        written = pid_file.read_text()
        with opener.open(f"http://127.0.0.1:{port}/d/d/v1/models", timeout=2) as r:  # bound before the pid file
            models = json.load(r)
        with opener.open(f"http://127.0.0.1:{port}/scepsy/v1/stats", timeout=2) as r:
            stats = json.load(r)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out.decode()
    assert written == f"{proc.pid}\n" and not pid_file.exists()
    assert [m["id"] for m in models["data"]] == ["a"]
    assert stats["models"]["d/a"]["calls"] == 0 and stats["models"]["d/a"]["replicas"] == 1
    assert b"gateway stopped" in out and b"Traceback" not in out


def test_busy_port_exits_1_with_one_line(tmp_path: Path) -> None:
    ep = tmp_path / "ep.yaml"
    ep.write_text("llms:\n  a:\n    replicas: [http://127.0.0.1:9]\n")
    pid_file = tmp_path / "gateway.pid"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "scepsy_hpc.gateway", "--endpoints", str(ep), "--port", str(port),
                               "--pid-file", str(pid_file)], cwd=ROOT, capture_output=True, timeout=30,
                              env={**os.environ, "SCEPSY_DEBUG": "0"})
    assert proc.returncode == 1
    assert proc.stderr.decode() == (f"error: gateway cannot listen on 127.0.0.1:{port}: address already in use "
                                    "(another process listens there: stop it or choose another --port)\n")
    assert proc.stdout == b"" and not pid_file.exists()


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_a_bad_hold_exits_2_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    ep = tmp_path / "ep.yaml"
    ep.write_text("llms:\n  a:\n    replicas: [http://127.0.0.1:9]\n")
    assert main(["--endpoints", str(ep), "--hold-s", value]) == 2
    err = capsys.readouterr().err
    assert f"--hold-s {value}" in err and "finite number of seconds" in err and "Traceback" not in err
