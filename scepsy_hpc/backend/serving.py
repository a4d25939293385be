"""A deployment's session directory, from its plan: serve.json for the node agents (`serve_config`, with
`deployment_models` naming the model behind each allocation key), the copy of the plan served
(`write_serve_files`) and the GPUs the placement uses per node (`placement_nodes`). The daemon
(`service.deploy`) calls these; the node agents read what they write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from scepsy_hpc.backend.records import ServeConfig, ServeInstance
from scepsy_hpc.backend.session import Session
from scepsy_hpc.engine.adapters import PARSER_FIELDS, EngineLaunch, check_launch, parse_prefix, parser_fields
from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.placement_entry import PlacementEntry
from scepsy_hpc.spec.records import PRIVATE, write_atomic

HEALTH_TIMEOUT_S = {"sim": 120.0, "vllm": 1800.0, "sglang": 1800.0}


def deployment_models(plan: Any, workflows: Sequence[Any], models: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Allocation key → (the workflow's model reference: a catalog name or an inline model, its ModelSpec).

    One workflow: the keys are its LLMs. Several: the plan's `routes` say which key serves each LLM of
    each workflow (LLMs of one catalog model share a key)."""
    from scepsy_hpc.spec.workflow import resolve_model

    out = {key: (wf.llms[llm].model, resolve_model(wf, llm, models))
           for key, (wf, llm) in _deployment_llms(plan, workflows).items()}
    missing = sorted(set(plan.allocation) - set(out))
    if missing:
        raise SpecError(f"the plan allocates {', '.join(missing)}, which no LLM of "
                        f"{', '.join(sorted(w.name for w in workflows))} uses (check the plan's routes)")
    return out


def _deployment_llms(plan: Any, workflows: Sequence[Any]) -> dict[str, tuple[Any, str]]:
    """Allocation key → (the first workflow that uses it, its LLM name there): whose `llms` entry sets the
    key's model and engine settings (tool_call_rate, prefix_caching)."""
    out: dict[str, tuple[Any, str]] = {}
    routes = plan.routes or {}
    for wf in workflows:
        for llm in wf.llms:
            key = routes.get(wf.name, {}).get(llm, llm) if routes else llm
            out.setdefault(key, (wf, llm))
    return out


def serve_config(plan: Any, wf: Any, models: Mapping[str, Any], gpus: Mapping[str, Any],
                 placement: Sequence[PlacementEntry], *, engine: str, engine_args: Sequence[str] = (),
                 launch_prefix: str = "", health_timeout_s: float | None = None, time_scale: float = 1.0,
                 seed: int = 0, parsers: Mapping[str, Mapping[str, str]] | None = None) -> ServeConfig:
    """serve.json: every engine of the placement with its launch fields (checked); `wf` is the plan's
    workflow, or its workflows for a plan of several. Output parsers: the catalog's, overridden by the plan's
    allocation, overridden by `parsers` (LLM, or `*` for every LLM → field → name: the CLI's). The workflow's
    `llms` entry sets each engine's prefix caching and, for the sim engine, its tool-call rate."""
    from scepsy_hpc.perf.model import EngineConfig
    from scepsy_hpc.spec.plan import replica_groups

    workflows = wf if isinstance(wf, (list, tuple)) else [wf]
    refs = deployment_models(plan, workflows, models)
    settings = {key: w.llms[llm] for key, (w, llm) in _deployment_llms(plan, workflows).items()}
    unknown = sorted(set(parsers or {}) - set(plan.allocation) - {"*"})
    if unknown:
        raise SpecError(f"parser override for {', '.join(unknown)}: the plan has no such LLM; its LLMs: "
                        f"{', '.join(sorted(plan.allocation))} (give LLM=NAME, or NAME alone for every LLM)")
    instances = []
    for p in placement:
        alloc = replica_groups(plan.allocation[p.llm])[p.replica]
        ref, model = refs[p.llm]
        if engine == "sim" and not isinstance(ref, str):
            raise SpecError(f"LLM {p.llm!r} has an inline model; the sim engine needs a model of the catalog by name")
        seqs = alloc.max_num_seqs or EngineConfig(model, gpus[plan.gpus.type], tp=alloc.tp,
                                                  gpu_frac=alloc.gpu_frac).max_num_seqs
        launch = EngineLaunch(engine=engine, model=ref if isinstance(ref, str) else model.hf_id, hf_id=model.hf_id,
                              served_name=p.llm, gpu=plan.gpus.type, tp=alloc.tp, gpu_frac=alloc.gpu_frac,
                              mem_frac=float(p.mem_frac_at(alloc.gpu_frac)), max_num_seqs=int(seqs), port=p.port,
                              time_scale=time_scale, seed=seed, extra_args=tuple(engine_args),
                              tool_call_rate=settings[p.llm].tool_call_rate if engine == "sim" else None,
                              prefix_caching=settings[p.llm].prefix_caching,
                              **parser_fields(model, engine, **_parser_overrides(alloc, parsers, p.llm)))
        check_launch(launch)
        instances.append(ServeInstance(llm=p.llm, replica=p.replica, node=p.node, gpus=list(p.gpus),
                                       gpu_frac=alloc.gpu_frac, mps_pct=p.mps_pct_at(alloc.gpu_frac), port=launch.port,
                                       launch=launch))
    return ServeConfig(engine=engine, launch_prefix=parse_prefix(launch_prefix),
                       health_timeout_s=health_timeout_s or HEALTH_TIMEOUT_S[engine], instances=instances)


def _parser_overrides(alloc: Any, parsers: Mapping[str, Mapping[str, str]] | None, llm: str) -> dict[str, str]:
    out = {f: getattr(alloc, f) for f in PARSER_FIELDS if getattr(alloc, f) is not None}
    for key in ("*", llm):
        out.update((parsers or {}).get(key, {}))
    return out


def write_serve_files(session: Session, config: ServeConfig, plan_path: Path) -> None:
    """serve.json for the agents, and a copy of the plan served (unless it is the session's own)."""
    session.write_serve_config(config)
    copy = session.dir / "plan.yaml"
    if plan_path.resolve() != copy.resolve():
        write_atomic(copy, plan_path.read_text(), mode=PRIVATE)


def placement_nodes(placement: Sequence[PlacementEntry]) -> dict[str, set[int]]:
    """The GPU indices the placement uses on each node."""
    per_node: dict[str, set[int]] = {}
    for p in placement:
        per_node.setdefault(p.node, set()).update(p.gpus)
    return per_node
