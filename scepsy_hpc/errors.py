"""One root exception with grouped subclasses (lower-layer errors are translated at the boundary), and the
one wrapper that reports them at every entry point (`scepsy`, the daemon, the gateway, the engine server, the
node agent)."""

from __future__ import annotations

import json
import os
import sys
from typing import Callable


PRIVATE_UMASK = 0o077   # every entry point's umask: what it creates is its owner's only


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


def error_document(exc: ScepsyError) -> dict[str, dict[str, object]]:
    """`{"error": {type, message, exit_code}}`: how `--json` and the daemon's API report a ScepsyError."""
    return {"error": {"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}}


def run_entry(body: Callable[[], int | None], *, json_errors: bool = False, prog: str = "") -> int:
    """Run an entry point's body and return its exit status, reporting a `ScepsyError` in one place.

    A `ScepsyError` prints `error: <message>` on stderr (a `SpecError` its problems, which name file
    and line or flag) and returns its `exit_code`; with `json_errors` (a command's `--json`, which
    promises one document on stdout, failures included) it also prints `{"error": {...}}` on stdout.
    KeyboardInterrupt returns 130 without a word. `SCEPSY_DEBUG=1` re-raises both, keeping the
    traceback. Any other exception is a bug and propagates with its traceback. `prog` (e.g.
    "scepsy engine-sim") labels each line, for logs that several processes write to.

    The body runs under umask PRIVATE_UMASK (the caller's umask is restored after): on a shared cluster
    nothing a deployment writes — state, keys, traces, logs, and whatever its children (jobs, engines)
    create — may be readable by group or others, whatever umask the user's shell has.
    """
    old_umask = os.umask(PRIVATE_UMASK)
    try:
        return int(body() or 0)
    except ScepsyError as exc:
        if os.environ.get("SCEPSY_DEBUG") == "1":
            raise
        label = f"{prog}: " if prog else ""
        lines = exc.problems if isinstance(exc, SpecError) else [f"error: {exc}"]
        print("\n".join(label + line for line in lines), file=sys.stderr)
        if json_errors:
            print(json.dumps(error_document(exc), indent=2))
        return exc.exit_code
    except KeyboardInterrupt:
        if os.environ.get("SCEPSY_DEBUG") == "1":
            raise
        return 130
    finally:
        os.umask(old_umask)
