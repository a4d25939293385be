"""What crosses the file boundary between `scepsy up`, the node agents and `status`/`down`/`drive`.

    serve.json       ServeConfig    written by `up`, read by every node agent
    agents/N.json    AgentReport    written by the agent of node N, read by `up` and `status`
    session.json     SessionRecord  written by `up` and `down`, read by every command on the session

Each is a `Record` (spec.records): frozen, unknown keys rejected, a `schema_version`; a file that is
not one this scepsy can read is a SpecError naming the file and the field, saying to re-run `scepsy up`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from scepsy_hpc.engine.adapters import EngineLaunch
from scepsy_hpc.spec.records import Record

RERUN = "re-run `scepsy up` to write it again"

AgentState = Literal["starting", "ready", "failed", "stopped"]
InstanceState = Literal["waiting", "starting", "healthy", "failed", "exited", "stopped"]
SessionState = Literal["starting", "serving", "down", "ended", "failed"]
BackendName = Literal["local", "slurm"]


class _Part(BaseModel):
    """A value inside a record (versioned with the record it belongs to)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ServeInstance(_Part):
    """One engine to start: where (node, planned GPU indices) and how (its launch fields)."""

    llm: str
    replica: int
    node: str
    gpus: list[int]        # planned GPU indices on the node
    gpu_frac: float
    mps_pct: int           # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE
    port: int              # the planned port; the agent takes another if it is taken
    launch: EngineLaunch


class ServeConfig(Record):
    """serve.json: every engine of a placement, for the node agents."""

    engine: str                      # sim, vllm or sglang
    launch_prefix: str = ""          # run engines through this shell prefix (module load …, apptainer exec …)
    health_timeout_s: float          # how long one engine may take to answer /health
    instances: list[ServeInstance]


class InstanceReport(_Part):
    """One engine as its node agent last saw it."""

    llm: str
    replica: int
    gpus: list[int]                  # physical GPU indices on the node
    gpu_frac: float
    mps_pct: int
    cuda_visible_devices: str = ""
    port: int = 0
    url: str = ""
    log: str = ""
    pid: int | None = None
    healthy: bool = False
    state: InstanceState = "waiting"
    error: str = ""
    remapped: bool = False           # Slurm gave other GPUs than planned
    started_at: float = 0.0          # Unix time the engine was spawned
    healthy_at: float = 0.0          # Unix time /health first answered


class AgentReport(Record):
    """agents/NODE.json: one node agent's progress."""

    node: str
    host: str
    pid: int
    state: AgentState
    error: str = ""
    job_id: str = ""
    updated: float
    instances: list[InstanceReport]


class SessionRecord(Record):
    """session.json: what `up` started, for the commands run later in other processes."""

    name: str = ""
    backend: BackendName = "local"
    job_id: str | None = None
    state: SessionState | None = None
    job_state: str | None = None     # the backend's final state once the job ended by itself
    engine: str | None = None
    up_pid: int | None = None        # the `up` process, which `down` stops first
    plan: str | None = None
    workflow: str | None = None
    gateway_url: str | None = None
    script: str | None = None
    time_scale: float | None = None
    error: str | None = None
    created: float | None = None
    updated: float | None = None
