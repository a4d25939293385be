"""Run simulated engines as subprocesses on this machine (tests, `--sim` runs, demos).

Each engine is `python -m scepsy_hpc.engine.sim_server …` on its own free port with its output in a
log file, started and stopped by `engine.supervisor`; start-up failures are EngineErrors quoting the
end of the engine's log. An engine's test hooks (fault injection) are off unless its spec says
`test_hooks=True`; with `api_key` it answers /v1 only to `Authorization: Bearer <api_key>` (given by
environment, as the node agent gives it). Neither is inherited from this process's environment.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from scepsy_hpc.engine.adapters import sim_behaviour_argv
from scepsy_hpc.engine.supervisor import (LOG_TAIL_LINES, Process, free_port, free_ports, is_healthy, start,
                                          stop_all, wait_healthy)

__all__ = ["LOG_TAIL_LINES", "LocalEngine", "SimEngineSpec", "free_port", "is_healthy", "sim_engines",
           "start_sim_engines", "stop_engines"]


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
    test_hooks: bool = False  # X-Sim-Fault, POST /scepsy/sim/fault, SCEPSY_SIM_FAULT (sim_server --test-hooks)
    api_key: str | None = field(default=None, repr=False)  # the engine secret (SCEPSY_ENGINE_API_KEY)
    tool_call_rate: float | None = None  # --tool-call-rate (None: the sim engine's default); a workflow's llms
    prefix_caching: bool = True  # False: --no-enable-prefix-caching (a workflow's llms.NAME.prefix_caching)

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
    proc: Process

    @property
    def api_key(self) -> str | None:
        """The engine secret it was started with (None: it needs none)."""
        return self.spec.api_key

    @property
    def api_base(self) -> str:
        """The OpenAI client base URL (`url` + /v1)."""
        return f"{self.url}/v1"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The engine's process."""
        return self.proc.popen

    @property
    def log_path(self) -> Path:
        """The engine's log file."""
        return self.proc.log_path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the engine's log."""
        return self.proc.log_tail(lines)


def _command(spec: SimEngineSpec, port: int, host: str, time_scale: float, seed: int) -> list[str]:
    return [sys.executable, "-m", "scepsy_hpc.engine.sim_server", "--model", spec.model, "--gpu", spec.gpu,
            "--tp", str(spec.tp), "--gpu-frac", repr(spec.gpu_frac), "--host", host, "--port", str(port),
            "--served-model-name", spec.served_name, "--time-scale", repr(time_scale),
            "--max-num-seqs", str(spec.max_num_seqs), "--max-batched-tokens", str(spec.max_batched_tokens),
            "--seed", str(seed)] + sim_behaviour_argv(spec.tool_call_rate, spec.prefix_caching) + (
                ["--test-hooks"] if spec.test_hooks else [])


def start_sim_engines(specs: Sequence[SimEngineSpec], time_scale: float, log_dir: str | Path, *,
                      host: str = "127.0.0.1", seed: int = 0, timeout_s: float = 30.0) -> list[LocalEngine]:
    """Start one sim engine per spec, all at once, and wait until each answers /health.

    Raises EngineError (after stopping all of them) if one exits or is not healthy within `timeout_s`."""
    log_dir = Path(log_dir)
    from scepsy_hpc.engine.sim_server import API_KEY_ENV, TEST_HOOKS_ENV

    # what the spec says, not what this process happens to have: no secret or hook leaks in from the environment
    env = {k: v for k, v in os.environ.items() if k not in (API_KEY_ENV, TEST_HOOKS_ENV)}
    # The child must import this very package even when it is not installed.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    engines: list[LocalEngine] = []
    try:
        for i, (spec, port) in enumerate(zip(specs, free_ports(len(specs), host))):
            url = f"http://{host}:{port}"
            own_env = {**env, API_KEY_ENV: spec.api_key} if spec.api_key else env
            proc = start(_command(spec, port, host, time_scale, seed),
                         log_dir / f"engine-{i}-{spec.served_name.replace('/', '_')}.log",
                         what=f"sim engine {spec.served_name!r} ({spec.model} on {spec.gpu}) at {url}", health=url,
                         env=own_env)
            engines.append(LocalEngine(spec, url, port, proc))
        wait_healthy([e.proc for e in engines], timeout_s)
    except BaseException:
        stop_engines(engines)
        raise
    return engines


def stop_engines(engines: Sequence[LocalEngine], timeout_s: float = 5.0) -> None:
    """SIGTERM every engine, wait up to `timeout_s` in all, then SIGKILL those still running."""
    stop_all([e.proc for e in engines], timeout_s)


@contextlib.contextmanager
def sim_engines(specs: Sequence[SimEngineSpec], time_scale: float, log_dir: str | Path, *,
                host: str = "127.0.0.1", seed: int = 0, timeout_s: float = 30.0) -> Iterator[list[LocalEngine]]:
    """`start_sim_engines` as a context manager that stops the engines on exit."""
    engines = start_sim_engines(specs, time_scale, log_dir, host=host, seed=seed, timeout_s=timeout_s)
    try:
        yield engines
    finally:
        stop_engines(engines)
