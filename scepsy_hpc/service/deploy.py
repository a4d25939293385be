"""From `scepsy up TARGET` to a job ready to submit: the request that crosses the control API, and the
steps the daemon takes for it (in a worker thread: planning can take seconds).

    UpRequest ─ prepare() ─▶ plan.yaml + serve.json in the deployment's session directory, a NodeJob

The target is a plan file (placed, or placed now on the cluster spec) or a workflow, planned now with
`scepsy plan`'s defaults on the cluster spec. A plan of several workflows is served as one
deployment: each allocation key is one LLM of the gateway, and every workflow's own LLM names are
aliases of the key the plan's `routes` give them.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from scepsy_hpc.backend.base import ClusterBackend, NodeJob, check_name
from scepsy_hpc.backend.records import ServeConfig
from scepsy_hpc.errors import SpecError
from scepsy_hpc.service.paths import mkdir_private
from scepsy_hpc.spec.placement_entry import PlacementEntry

_REPO = Path(__file__).resolve().parents[2]


class UpRequest(BaseModel):
    """What `scepsy up` asks the daemon for (paths absolute: the daemon runs elsewhere)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    target: str
    backend: Literal["local", "slurm"] = "local"
    engine: Literal["sim", "vllm", "sglang"] = "sim"
    cluster: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    target_rps: float | None = Field(default=None, gt=0)
    # the gateway's request cap for the deployment: N, or "plan" (the plan's predicted.max_requests); None: none
    max_requests: Annotated[StrictInt, Field(ge=1)] | Literal["plan"] | None = None
    launch_prefix: str = ""
    engine_args: list[str] = []
    # output parsers from the CLI (LLM or "*" → tool_call_parser / reasoning_parser / chat_template → name),
    # overriding the plan's and the catalog's
    parsers: dict[str, dict[Literal["tool_call_parser", "reasoning_parser", "chat_template"],
                            Annotated[str, Field(min_length=1, max_length=4096)]]] = {}
    time_scale: float = Field(default=1.0, gt=0)
    health_timeout_s: float | None = Field(default=None, gt=0)
    start_timeout_s: float = Field(default=3600.0, gt=0)
    max_resubmits: int = Field(default=3, ge=0)          # a job that ends is resubmitted at most this many times …
    resubmit_window_s: float = Field(default=1800.0, gt=0)   # … within this window (the circuit breaker)
    cutover: bool = True                                  # replace a job before its walltime ends
    # lead = queue wait + time to healthy + this
    cutover_margin_s: float = Field(default=60.0, ge=0, le=86400, allow_inf_nan=False)
    # in-flight calls of a drained job get this long
    drain_grace_s: float = Field(default=120.0, ge=0, le=86400, allow_inf_nan=False)
    # an engine with calls and no token for this long is restarted (0: never)
    stall_timeout_s: float = Field(default=120.0, ge=0, le=86400, allow_inf_nan=False)
    seed: int = Field(default=0, ge=0)
    models: str | None = None
    gpu_catalog: str | None = None


@dataclass(frozen=True)
class Prepared:
    """A deployment ready to submit."""

    plan_path: Path
    workflows: tuple[str, ...]
    spec_paths: tuple[str, ...]
    config: ServeConfig                      # every engine of the placement (the shape)
    template: JobTemplate                    # what every job of the deployment asks Slurm for
    aliases: Mapping[str, tuple[str, ...]]   # allocation key → other names its workflows call it by
    weights: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
                                             # mixed-group key → each replica's routing weight, by replica number
    max_requests: int | None = None          # the gateway's request cap (None: none)


class JobTemplate(BaseModel):
    """What each job of a deployment asks its backend for, beside its node and GPUs (kept in the state, so a
    replacement is submitted like the first job)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None
    gres_type: str | None = None
    env: dict[str, str] = {}
    python: str = sys.executable

    def job(self, name: str, node: str, gpus: int, session_dir: Path) -> NodeJob:
        """The job that runs the node agent of `session_dir` on `node`, holding `gpus` GPUs."""
        return NodeJob(name=name, nodes=(node,), gpus_per_node=gpus,
                       command=(self.python, "-m", "scepsy_hpc.backend.agent", "--session", str(session_dir)),
                       log_dir=session_dir / "logs", workdir=session_dir, partition=self.partition,
                       account=self.account, qos=self.qos, time=self.time, constraint=self.constraint,
                       gres_type=self.gres_type, env=dict(self.env), session=session_dir)


def job_name(name: str, unit: str = "") -> str:
    """`scepsy-NAME[-UNIT]-NONCE`: the nonce tells this submission from an earlier one of the same unit."""
    return f"scepsy-{name[:40]}" + (f"-{unit[:16]}" if unit else "") + f"-{secrets.token_hex(3)}"


def _find_target(target: str) -> Path:
    from scepsy_hpc.spec.catalog import resolve_input

    path = Path(target)
    if path.exists():
        return path
    for kind in ("plans", "workflows"):
        try:
            return resolve_input(target, kind)
        except SpecError:
            continue
    raise SpecError(f"{target}: no such plan or workflow file, and no shipped one of that name")


def _workflow_files(data: Mapping[str, Any]) -> list[Path]:
    """The workflow files a plan names (its provenance), else the shipped workflows of its names."""
    from scepsy_hpc.spec.catalog import resolve_input

    prov = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    src = prov.get("workflow_file")
    files = [src] if isinstance(src, str) else list(src) if isinstance(src, list) else []
    names = [data["workflow"]] if data.get("workflow") else list(data.get("workflows") or [])
    if files and all(isinstance(f, str) and Path(f).exists() for f in files):
        return [Path(f) for f in files]
    if not names:
        raise SpecError("the plan names no workflow (key workflow or workflows): add it, so the engines' models are known")
    return [resolve_input(str(n), "workflows") for n in names]


def load_target(req: UpRequest, session_dir: Path, models: Any, gpus: Any, cluster: Any,
                say: Callable[[str], None]) -> tuple[Any, list[Any], Path, list[Path]]:
    """(plan, workflows, plan path, workflow files): the plan given, or one planned now for the workflow given."""
    from scepsy_hpc.spec.plan import load_plan
    from scepsy_hpc.spec.source import load_yaml
    from scepsy_hpc.spec.workflow import load_workflow

    path = _find_target(req.target)
    data, smap = load_yaml(path)
    if isinstance(data, dict) and "allocation" in data:
        from scepsy_hpc.spec.placement_check import check_placement

        files = _workflow_files(data)
        wfs = [load_workflow(f, models) for f in files]
        plan = load_plan(path, wfs[0] if len(wfs) == 1 else None, models, gpus)
        # The plan's own checks ran in load_plan. On the local backend the cluster spec is the truth about the
        # nodes, so the placement is checked against it here, before anything is written (as `scepsy validate
        # PLAN --cluster CLUSTER` does); on Slurm the live partition is, and the backend's preflight checks
        # nodes, GPU indices and node states against it before anything is submitted.
        if req.backend == "local":
            problems = check_placement(plan, cluster, smap)
            if problems:
                raise SpecError(problems)
        return plan, wfs, path, files
    wf = load_workflow(path, models)
    from scepsy_hpc.planning import PlanRequest, plan
    from scepsy_hpc.planning.render import write_plan

    plan_path = session_dir / "plan.yaml"
    say(f"planning {wf.name} on {req.cluster} (as `scepsy plan {path} --cluster {req.cluster}"
        + (f" --target-rps {req.target_rps:g}" if req.target_rps else "") + "`)")
    request = PlanRequest(workflows=(wf,), models=models, gpus=gpus, cluster=cluster, cluster_ref=req.cluster,
                          target_rps={wf.name: req.target_rps} if req.target_rps else {},
                          workflow_files=(str(path.resolve()),))
    write_plan(plan(request).to_plan(), plan_path)
    return load_plan(plan_path, wf, models, gpus), [wf], plan_path, [path]


def placement_of(plan: Any, cluster: Any, gpus: Any) -> list[PlacementEntry]:
    """The plan's placement, or one made now on the cluster spec's nodes."""
    if plan.placement:
        return list(plan.placement)
    from scepsy_hpc.place.placement import place
    from scepsy_hpc.topology.build import from_cluster

    if not cluster.node_groups:
        raise SpecError("the plan has no placement: plan it with `scepsy plan --cluster CLUSTER` (or give a cluster spec "
                        "with node_groups to place it on)")
    return place(plan.allocation, from_cluster(cluster, gpus), gpu_type=plan.gpus.type).entries()


def aliases_of(plan: Any, workflows: Sequence[Any]) -> dict[str, tuple[str, ...]]:
    """Per allocation key, the names a workflow's code uses for it: `WORKFLOW/LLM` for every route, and the
    bare LLM name where it names one key only (a plan of one workflow needs none: its keys are its names)."""
    if not plan.routes:
        return {}
    bare: dict[str, set[str]] = {}
    out: dict[str, list[str]] = {k: [] for k in plan.allocation}
    for wf in workflows:
        for llm, key in plan.routes.get(wf.name, {}).items():
            out.setdefault(key, []).append(f"{wf.name}/{llm}")
            bare.setdefault(llm, set()).add(key)
    for llm, keys in bare.items():
        (key,) = keys if len(keys) == 1 else (None,)
        if key is not None and llm not in plan.allocation:
            out[key].append(llm)
    return {k: tuple(sorted(set(v))) for k, v in out.items() if v}


def weights_of(plan: Any, workflows: Sequence[Any], models: Mapping[str, Any], gpus: Mapping[str, Any]
               ) -> dict[str, tuple[float, ...]]:
    """Per allocation key served by a mixed group, each replica's routing weight by replica number (calls/s
    one replica carries: `perf.fit.replica_weights`, 4 significant digits so the endpoints file reads well);
    like replicas need none (their weight is 1)."""
    from scepsy_hpc.backend.serving import deployment_models
    from scepsy_hpc.perf.fit import replica_weights
    from scepsy_hpc.spec.plan import groups_of

    mixed = [k for k, entry in plan.allocation.items() if len(groups_of(entry)) > 1]
    if not mixed:
        return {}
    refs = deployment_models(plan, workflows, models)
    gpu = gpus[plan.gpus.type]
    return {k: tuple(float(f"{w:.4g}") for w in replica_weights(plan.allocation[k], refs[k][1], gpu)) for k in mixed}


def request_cap_of(plan: Any, req: UpRequest) -> int | None:
    """The deployment's request cap: `--max-requests N`; with `--max-requests plan` the plan's
    `predicted.max_requests` (summed over the workflows of a plan that serves several), a SpecError where the
    plan has none; else none."""
    if req.max_requests != "plan":
        return req.max_requests
    pred = plan.predicted or {}
    caps = [v.get("max_requests") if isinstance(v, dict) else None for v in pred.values()] if plan.workflows else \
        [pred.get("max_requests")]
    if caps and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in caps):
        return sum(caps)   # type: ignore[arg-type]
    raise SpecError(f"--max-requests plan: the plan {req.target} gives no predicted.max_requests"
                    + (" for every workflow" if plan.workflows else "")
                    + " (`scepsy plan` writes it for workflows whose calls continue conversations); "
                    "give a number: --max-requests N")


def prepare(req: UpRequest, session_dir: Path, backend: ClusterBackend, say: Callable[[str], None]) -> Prepared:
    """Plan (if needed), place, check against the backend, write plan.yaml and serve.json; the job to submit."""
    from scepsy_hpc.backend.serving import serve_config, write_serve_files
    from scepsy_hpc.backend.session import Session
    from scepsy_hpc.spec.catalog import load_gpus, load_models, resolve_input
    from scepsy_hpc.spec.cluster import load_cluster

    check_name(req.name, "deployment name")
    models, gpus = load_models(req.models), load_gpus(req.gpu_catalog)
    cluster = load_cluster(resolve_input(req.cluster, "clusters"), gpus)
    session = Session(session_dir)
    mkdir_private(session_dir)
    plan, wfs, plan_path, wf_files = load_target(req, session_dir, models, gpus, cluster, say)
    placement = placement_of(plan, cluster, gpus)
    config = serve_config(plan, wfs, models, gpus, placement, engine=req.engine, engine_args=tuple(req.engine_args),
                          launch_prefix=req.launch_prefix, health_timeout_s=req.health_timeout_s,
                          time_scale=req.time_scale, seed=req.seed, parsers=req.parsers)
    config = config.model_copy(update={"stall_timeout_s": req.stall_timeout_s})
    slurm = cluster.slurm
    partition = backend.preflight(req.partition or (slurm.partition if slurm else None), placement)
    write_serve_files(session, config, plan_path)
    copy = session_dir / "plan.yaml"
    gres_type = next((k for k, v in (slurm.gpu_types if slurm else {}).items() if v == plan.gpus.type), None)
    pythonpath = os.pathsep.join(p for p in (str(_REPO), os.environ.get("PYTHONPATH")) if p)
    template = JobTemplate(partition=partition, account=req.account or (slurm.account if slurm else None),
                           qos=req.qos or (slurm.qos if slurm else None), time=req.time or (slurm.time if slurm else None),
                           constraint=slurm.constraint if slurm else None, gres_type=gres_type,
                           env={"PYTHONPATH": pythonpath})
    return Prepared(plan_path=copy, workflows=tuple(w.name for w in wfs),
                    spec_paths=tuple(str(f.resolve()) for f in [_find_target(req.target), *wf_files]),
                    config=config, template=template, aliases=aliases_of(plan, wfs),
                    weights=weights_of(plan, wfs, models, gpus), max_requests=request_cap_of(plan, req))
