"""Helpers shared by the subcommands: shipped-name resolution, JSON cleaning, workload inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from scepsy_hpc.errors import SpecError


def resolve_input(arg: str, kind: str) -> Path:
    """A path as given, or the name of a shipped file under configs/<kind>/."""
    from scepsy_hpc.spec.catalog import config_dir

    p = Path(arg)
    if p.exists() or p.suffix in (".yaml", ".yml"):
        return p
    shipped = config_dir() / kind / f"{arg}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(q.stem for q in (config_dir() / kind).glob("*.yaml"))
    raise SpecError(f"{arg}: no such file, and no shipped {kind[:-1]} of that name; shipped: {', '.join(names) or 'none'}")


def jsonable(x: Any) -> Any:
    """`x` with non-finite floats as None, tuples as lists (JSON has no inf or NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


@dataclass
class Workload:
    """Request graphs and call mix for a predictor, and where they came from."""

    graphs: list[Any]
    mix: dict[str, list[tuple[int, int]]]
    seqs: list[Any] | None
    source: str


def load_workload(wf: Any, trace_path: str | None, samples: int, seed: int) -> Workload:
    """From a trace file (its LLM names must be the workflow's), or sampled from the program."""
    from scepsy_hpc.predict.inputs import sample_mix, sample_program
    from scepsy_hpc.trace.graph import from_trace
    from scepsy_hpc.trace.records import read_trace
    from scepsy_hpc.trace.stats import call_mix

    if trace_path:
        trace = read_trace(trace_path)
        unknown = sorted({c.llm for c in trace.calls} - set(wf.llms))
        if unknown:
            raise SpecError(f"{trace_path}: the trace calls LLM(s) {', '.join(unknown)} that workflow {wf.name!r} "
                            f"does not define (it has {', '.join(wf.llms)}); trace this workflow or fix its llms:")
        graphs = from_trace(trace)
        if not any(g.ok for g in graphs):
            raise SpecError(f"{trace_path}: no successful request in the trace; nothing to learn from")
        return Workload(graphs, call_mix(graphs), None, f"trace {trace_path} ({len(graphs)} requests)")
    if samples < 1:
        raise SpecError(f"--samples {samples}: sample at least one request")
    seqs = sample_program(wf, samples, seed)
    return Workload([], sample_mix(seqs), seqs, f"program of {wf.name} ({samples} sampled requests, unloaded)")


def profile_source(wf: Any, models: Any, gpus: Any, work: Workload, profiles_dir: str | None, seed: int) -> Any:
    """Where the predictor's profiles come from for this workload."""
    from scepsy_hpc.predict.inputs import ProfileSource

    return ProfileSource(wf, models, gpus, work.mix, profiles_dir, seed=seed, seqs=work.seqs,
                         graphs=work.graphs if work.seqs is None else None)


def graphs_for(work: Workload, profiles: Mapping[str, Any]) -> list[Any]:
    """The workload's graphs; sampled programs get their unloaded call times from `profiles`."""
    from scepsy_hpc.predict.inputs import program_graphs

    return work.graphs if work.seqs is None else program_graphs(work.seqs, profiles)


def make_console(stderr: bool = False) -> Any:
    """A rich Console; 120 columns when not writing to a terminal, so piped tables do not fold."""
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 120)
