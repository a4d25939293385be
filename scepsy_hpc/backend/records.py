"""What crosses the file boundary between the daemon and the node agents (a deployment's session directory).

    serve.json       ServeConfig    written by the daemon for `scepsy up`, read by every node agent
    agents/N.json    AgentReport    written by the agent of node N, read by the daemon

Each is a `Record` (spec.records): frozen, unknown keys rejected, a `schema_version`; a file that is
not one this scepsy can read is a SpecError naming the file and the field, saying to re-run `scepsy up`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from scepsy_hpc.engine.adapters import EngineLaunch
from scepsy_hpc.spec.records import Record

RERUN = "re-run `scepsy up` to write it again"

AgentState = Literal["starting", "ready", "failed", "stopped"]
InstanceState = Literal["waiting", "starting", "healthy", "failed", "exited", "stopped"]


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
    """serve.json: every engine of a placement, for the node agents. Times are wall seconds (none is scaled
    by a sim engine's time scale: the agent's clock is the wall's)."""

    engine: str                      # sim, vllm or sglang
    launch_prefix: str = ""          # run engines through this shell prefix (module load …, apptainer exec …)
    health_timeout_s: float          # how long one engine may take to answer /health
    max_restarts: int = 5            # an engine that exits (or is wedged) is restarted, at most this many times …
    restart_window_s: float = 600.0  # … within this window; then it is left failed
    progress_check_s: float = Field(default=5.0, gt=0)   # how often the agent reads each engine's /metrics
    stall_timeout_s: float = Field(default=120.0, ge=0)  # requests waiting or running and no token counted
                                     # for this long: the engine is wedged although /health may answer 200;
                                     # it is killed and restarted as if it had exited (0: never judged wedged)
    engine_secret: str | None = Field(default=None, repr=False)
                                     # the job's engine secret: engines accept only calls that carry it
                                     # (`Authorization: Bearer`); passed to them by environment, never argv
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
    healthy_at: float = 0.0          # Unix time /health last turned healthy
    restarts: int = 0                # times the agent restarted it after it exited or was found wedged
    last_restart_reason: str = ""    # why it was last restarted: "exited with code -9", "wedged: …"
    last_restart_at: float | None = None   # Unix time of that restart


class AgentReport(Record):
    """agents/NODE.json: one node agent's progress."""

    node: str
    host: str
    pid: int
    state: AgentState
    error: str = ""
    job_id: str = ""
    updated: float
    draining_since: float | None = None   # Unix time the walltime/preemption warning came: the job ends soon,
                                          # route nothing new here (the engines serve on until SIGTERM)
    instances: list[InstanceReport]
