"""One root exception with grouped subclasses; lower-layer errors are translated at the boundary."""

from __future__ import annotations


class ScepsyError(Exception):
    """Root of every error scepsy_hpc reports to a user (printed without traceback by the CLI)."""

    exit_code = 1


class SpecError(ScepsyError):
    """An input file (workflow, catalog, cluster, plan) is invalid; the message names file and line."""

    exit_code = 2

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class TopologyError(SpecError):
    """A topology source (topology.conf/yaml, scontrol, nvidia-smi, gres.conf, sinfo) cannot be read;
    the message names the source, the line and what was expected there."""


class InfeasibleError(ScepsyError):
    """The request cannot be met with the resources given; the message says what is missing."""

    exit_code = 3


class SolverError(ScepsyError):
    """The optimisation solver failed or returned an unusable status."""


class SlurmError(ScepsyError):
    """A Slurm command failed; the message carries the command and its stderr."""


class EngineError(ScepsyError):
    """An inference engine failed to start or to answer."""
