"""`scepsy validate`: check workflow, plan, cluster and catalog files; every problem with its line."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from scepsy_hpc.commands.common import resolve_input
from scepsy_hpc.errors import SpecError


def add_arguments(sub: Any) -> None:
    """The `validate` subcommand's arguments."""
    v = sub.add_parser("validate", help="check workflow, plan, cluster and catalog files")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--cluster", metavar="FILE", help="check plans' placement against this cluster spec (a file or a shipped "
                   "name); a cluster spec among FILE does the same for the plans after it")
    v.add_argument("--json", action="store_true", help="print one JSON object: ok, files (path, kind, ok, problems), problems")
    v.set_defaults(run=run)


def kind_of(data: Any, path: Path) -> str:
    """What a loaded YAML file is: workflow, plan, cluster, models or gpus (a catalog)."""
    if isinstance(data, dict):
        if "allocation" in data:
            return "plan"
        if "program" in data or "llms" in data:
            return "workflow"
        if "node_groups" in data or "slurm" in data:
            return "cluster"
        values = list(data.values())
        if values and all(isinstance(v, dict) and "hf_id" in v for v in values):
            return "models"
        if values and all(isinstance(v, dict) and "mem_gib" in v for v in values):
            return "gpus"
    raise SpecError(f"{path}:1: cannot tell what this file is: a workflow has 'program:', a plan 'allocation:', "
                    f"a cluster 'node_groups:' or 'slurm:', a catalog maps names to models or GPUs")


WORKFLOW_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def _usable_path(text: str) -> bool:
    return "\0" not in text and len(text) < 4096


def run(args: argparse.Namespace) -> int:
    """Validate workflow, plan, cluster and catalog files; exit 2 with every problem found."""
    from scepsy_hpc.spec.catalog import _GPUs, _Models, load_gpus, load_models
    from scepsy_hpc.spec.cluster import load_cluster, parse_cluster
    from scepsy_hpc.spec.placement_check import check_placement
    from scepsy_hpc.spec.plan import parse_plan
    from scepsy_hpc.spec.source import load_yaml, validate
    from scepsy_hpc.spec.workflow import load_workflow, parse_workflow

    problems: list[str] = []
    files: list[dict[str, Any]] = []
    models = gpus = None
    seen_wfs: dict[str, Any] = {}   # workflows validated on this command line, by name
    cluster = None                  # the cluster spec plans' placements are checked against
    if getattr(args, "cluster", None):
        try:
            models, gpus = load_models(args.models), load_gpus(args.gpu_catalog)
            cluster = load_cluster(resolve_input(args.cluster, "clusters"), gpus)
        except SpecError as exc:
            print("\n".join(f"--cluster {args.cluster}: {p}" if not p.startswith(args.cluster) else p
                            for p in exc.problems), file=sys.stderr)
            return 2
    for arg in args.files:
        try:
            path = Path(arg)
            data, smap = load_yaml(path)
            kind = kind_of(data, path)
            if kind == "models":
                validate(_Models, data, smap)
            elif kind == "gpus":
                validate(_GPUs, data, smap)
            else:
                models = models if models is not None else load_models(args.models)
                gpus = gpus if gpus is not None else load_gpus(args.gpu_catalog)
                if kind == "workflow":
                    w = parse_workflow(data, smap, models)
                    seen_wfs[w.name] = w
                elif kind == "cluster":
                    spec = parse_cluster(data, smap, gpus)
                    cluster = cluster if getattr(args, "cluster", None) else spec
                else:
                    wf = None
                    name = data.get("workflow")
                    prov = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
                    src = prov.get("workflow_file") if isinstance(prov.get("workflow_file"), str) else None
                    if src is not None and not _usable_path(src):
                        src = None
                    if isinstance(name, str) and not WORKFLOW_NAME.fullmatch(name):
                        raise SpecError(f"{smap.where(('workflow',))}: workflow: {name!r} is not a workflow name "
                                        f"(letters, digits, '.', '_', '-')")
                    if isinstance(name, str):
                        if name in seen_wfs:
                            wf = seen_wfs[name]
                        elif src and Path(src).exists():
                            wf = load_workflow(src, models)
                        else:
                            try:
                                found_wf = resolve_input(name, "workflows")
                            except SpecError as exc:
                                raise SpecError(f"{smap.where(('workflow',))}: workflow: {exc}") from None
                            wf = load_workflow(found_wf, models)
                    plan = parse_plan(data, smap, wf, models, gpus)
                    if cluster is not None:
                        found = check_placement(plan, cluster, smap)
                        if found:
                            raise SpecError(found)
            files.append({"path": str(path), "kind": kind, "ok": True})
            if not args.json:
                print(f"{path}: ok ({kind})")
        except SpecError as exc:
            files.append({"path": str(arg), "ok": False, "problems": exc.problems})
            problems.extend(exc.problems)
    if args.json:
        print(json.dumps({"ok": not problems, "files": files, "problems": problems}, indent=2))
    else:
        for p in problems:
            print(p, file=sys.stderr)
    return 2 if problems else 0
