"""Helpers shared by the subcommands: shipped-name resolution, JSON cleaning, profile inputs, the console."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from scepsy_hpc.planning.inputs import Workload


def resolve_input(arg: str, kind: str) -> Path:
    """A path as given, or the name of a shipped file (`spec.catalog.resolve_input`, imported when called so that
    `scepsy --help` loads no pydantic)."""
    from scepsy_hpc.spec.catalog import resolve_input as resolve

    return resolve(arg, kind)


def jsonable(x: Any) -> Any:
    """`x` with non-finite floats as None, tuples as lists (JSON has no inf or NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


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
