"""The planning API's values: `PlanRequest` in, `PlanResult` out (both frozen).

This module imports nothing heavy at run time: the CLI reads its defaults while building the
argument parser, which must stay fast (`scepsy --help`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from scepsy_hpc.allocate.planner import Outcome, Planner
    from scepsy_hpc.place.placement import Placement
    from scepsy_hpc.spec.catalog import GPUSpec, ModelSpec
    from scepsy_hpc.spec.cluster import ClusterSpec
    from scepsy_hpc.spec.plan import Plan
    from scepsy_hpc.spec.workflow import Workflow
    from scepsy_hpc.topology.model import Topology

POLICIES = ("milp", "equal", "independent", "paper-enum")
GOALS = ("target", "max-throughput", "slo")
DEFAULT_GPU_TYPE = "h100-sxm"
DEFAULT_MAX_TP = 8
DEFAULT_MAX_UTIL = 0.9
DEFAULT_THROUGHPUT_TOL = 0.03
DEFAULT_TIME_LIMIT_S = 30.0
DEFAULT_GAP = 1e-6
DEFAULT_SAMPLES = 1000
DEFAULT_SIMULATE_REQUESTS = 500


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: workflows, GPUs (a budget or a cluster to place on), a policy, a goal, tuning.

    workflows            the workflows served together (LLMs naming the same catalog model share a
                         deployment when there are several)
    models, gpus         the model and GPU catalogs
    policy               milp, or a baseline: equal, independent, paper-enum
    goal                 target (lowest latency at the rates), max-throughput, slo (highest rate
                         whose predicted mean latency ≤ latency_slo_s); None: from the workflows'
                         targets (their rates, else their one common latency SLO)
    target_rps           per-workflow rates replacing the workflows' targets (the goal is then target)
    rate_scale           the target goal plans at rate_scale × the rates
    gpu_type, gpu_count  the GPU budget; with a cluster, the count is capped by its free GPUs and
                         the type defaults to its only one
    max_tp               the largest tp (default: the NVLink domain, or 8)
    cluster, cluster_ref a cluster spec to plan on and place the plan on, and how the user named it
    trace, profiles_dir  statistics from a trace (one workflow), measured profiles
    samples, seed        program samples per workflow; the seed of sampling, profiles and the check
    sim_check            run the simulator check of the milp plan (planning.simcheck)
    sim_check_throughput with the max-throughput goal, race the milp plan by simulated sustainable rate
    simulate_requests    also simulate the plan at its rate with this many requests (one workflow)
    workflow_files       the workflows' files, for the plan's provenance
    """

    workflows: tuple[Workflow, ...]
    models: Mapping[str, ModelSpec]
    gpus: Mapping[str, GPUSpec]
    policy: str = "milp"
    goal: str | None = None
    latency_slo_s: float | None = None
    target_rps: Mapping[str, float] = field(default_factory=dict)
    rate_scale: float = 1.0
    gpu_type: str | None = None
    gpu_count: int | None = None
    max_tp: int | None = None
    cluster: ClusterSpec | None = None
    cluster_ref: str | None = None
    max_util: float = DEFAULT_MAX_UTIL
    throughput_tol: float = DEFAULT_THROUGHPUT_TOL
    mixed_groups: bool = True
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    gap: float = DEFAULT_GAP
    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    trace: str | None = None
    profiles_dir: str | None = None
    sim_check: bool = True
    sim_check_throughput: bool = False
    simulate_requests: int | None = None
    workflow_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanResult:
    """A plan: the policy's outcome on the planner as it planned (its GPU count and NVLink-domain
    caps after any re-plan around a placement failure), the placement when a cluster was given,
    and the simulated figures when asked for."""

    request: PlanRequest
    planner: Planner
    outcome: Outcome
    goal: str
    latency_slo_s: float | None
    placement: Placement | None = None
    topology: Topology | None = None
    simulated: Mapping[str, Any] | None = None

    @property
    def allocation(self) -> dict[str, Any]:
        """Per deployment: tp, GPU fraction, replicas (a list of those for a mixed group)."""
        from scepsy_hpc.allocate.allocation import as_allocation

        return as_allocation(self.outcome.choice)

    @property
    def gpu_type(self) -> str:
        """The GPU type planned on."""
        return self.planner.gpu_name

    @property
    def gpu_count(self) -> int:
        """The GPUs planned on (fewer than asked when a fraction did not place)."""
        return self.planner.n_gpus

    @property
    def status(self) -> str:
        """The solver's status (optimal, feasible, heuristic, under-capacity, …)."""
        return self.outcome.status

    @property
    def solve_time_s(self) -> float:
        """Seconds spent solving, the simulator check's MILPs included."""
        return self.outcome.solve_time_s

    @property
    def notes(self) -> tuple[str, ...]:
        """What the planner has to say about the plan."""
        return self.outcome.notes

    def to_plan(self) -> Plan:
        """The plan file content (with the placement when there is one)."""
        from scepsy_hpc.planning.render import to_plan

        return to_plan(self)

    def summary(self, plot: str | None = None, plan_file: str | None = None) -> dict[str, Any]:
        """The JSON form `scepsy plan --json` prints; `plot` and `plan_file`: where the CLI drew the
        placement and wrote the plan."""
        from scepsy_hpc.planning.render import summarise

        return summarise(self, plot, plan_file)
