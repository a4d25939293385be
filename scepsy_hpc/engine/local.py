"""Run simulated engines as subprocesses on this machine (tests, `--sim` runs, demos).

Each engine is `python -m scepsy_hpc.engine.sim_server …` on its own free port with its output in a
log file. Start-up failures are translated into EngineError quoting the end of the engine's log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Sequence

from scepsy_hpc.errors import EngineError

LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class SimEngineSpec:
    """One simulated engine to start (fields as the sim_server flags of the same names)."""

    model: str  # key of configs/models.yaml
    gpu: str  # key of configs/gpus.yaml
    tp: int = 1
    gpu_frac: float = 1.0
    served_model_name: str | None = None  # default: model
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192

    @property
    def served_name(self) -> str:
        """The model name clients send."""
        return self.served_model_name or self.model


@dataclass
class LocalEngine:
    """A running engine subprocess: `url` is http://host:port (the OpenAI base URL is `api_base`)."""

    spec: SimEngineSpec
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def api_base(self) -> str:
        """The OpenAI client base URL (`url` + /v1)."""
        return f"{self.url}/v1"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the engine's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (another process may still take it before it is used)."""
    return _free_ports(1, host)[0]


def _free_ports(n: int, host: str) -> list[int]:
    # Hold every socket until all are chosen, so that the kernel cannot hand out one port twice.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _command(spec: SimEngineSpec, port: int, host: str, time_scale: float, seed: int) -> list[str]:
    return [sys.executable, "-m", "scepsy_hpc.engine.sim_server", "--model", spec.model, "--gpu", spec.gpu,
            "--tp", str(spec.tp), "--gpu-frac", repr(spec.gpu_frac), "--host", host, "--port", str(port),
            "--served-model-name", spec.served_name, "--time-scale", repr(time_scale),
            "--max-num-seqs", str(spec.max_num_seqs), "--max-batched-tokens", str(spec.max_batched_tokens),
            "--seed", str(seed)]


# Engines are on our network: never route the health probe through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def is_healthy(url: str | None, timeout_s: float = 1.0) -> bool:
    """Whether the server at base URL `url` answers GET /health with 200 (no proxy: engines are on our network)."""
    if not url:
        return False
    try:
        with _OPENER.open(f"{url}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start_sim_engines(specs: Sequence[SimEngineSpec], time_scale: float, log_dir: str | Path, *,
                      host: str = "127.0.0.1", seed: int = 0, timeout_s: float = 30.0) -> list[LocalEngine]:
    """Start one sim engine per spec, all at once, and wait until each answers /health.

    Raises EngineError (after stopping all of them) if one exits or is not healthy within `timeout_s`."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The child must import this very package even when it is not installed.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    engines: list[LocalEngine] = []
    try:
        for i, (spec, port) in enumerate(zip(specs, _free_ports(len(specs), host))):
            log_path = log_dir / f"engine-{i}-{spec.served_name.replace('/', '_')}.log"
            log = open(log_path, "wb")
            proc = subprocess.Popen(_command(spec, port, host, time_scale, seed), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
            engines.append(LocalEngine(spec, f"http://{host}:{port}", port, proc, log_path, log))
        deadline = time.monotonic() + timeout_s
        pending = list(engines)
        while pending:
            for eng in list(pending):
                if eng.process.poll() is not None:
                    raise EngineError(f"sim engine {eng.spec.served_name!r} ({eng.spec.model} on {eng.spec.gpu}) exited with "
                                      f"code {eng.process.returncode} during start-up; end of {eng.log_path}:\n{eng.log_tail()}")
                if is_healthy(eng.url):
                    pending.remove(eng)
            if pending and time.monotonic() > deadline:
                eng = pending[0]
                raise EngineError(f"sim engine {eng.spec.served_name!r} at {eng.url} not healthy after {timeout_s:g} s; "
                                  f"end of {eng.log_path}:\n{eng.log_tail()}")
            if pending:
                time.sleep(0.05)
    except BaseException:
        stop_engines(engines)
        raise
    return engines


def stop_engines(engines: Sequence[LocalEngine], timeout_s: float = 5.0) -> None:
    """SIGTERM every engine, wait up to `timeout_s` in all, then SIGKILL those still running."""
    for eng in engines:
        if eng.process.poll() is None:
            eng.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for eng in engines:
        try:
            eng.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            eng.process.kill()
            eng.process.wait()
        if eng._log is not None:
            eng._log.close()
            eng._log = None


@contextlib.contextmanager
def sim_engines(specs: Sequence[SimEngineSpec], time_scale: float, log_dir: str | Path, *,
                host: str = "127.0.0.1", seed: int = 0, timeout_s: float = 30.0) -> Iterator[list[LocalEngine]]:
    """`start_sim_engines` as a context manager that stops the engines on exit."""
    engines = start_sim_engines(specs, time_scale, log_dir, host=host, seed=seed, timeout_s=timeout_s)
    try:
        yield engines
    finally:
        stop_engines(engines)
