"""What the planner learns a workflow's calls from: a trace, or samples of its program."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scepsy_hpc.errors import SpecError


@dataclass(frozen=True)
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
