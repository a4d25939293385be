"""The `scepsy` command: the parser built from the command modules, and the dispatch.

Each `scepsy_hpc.commands.<module>` owns `add_arguments(subparsers)` and `run(args)`; a module's
top level imports nothing heavy, and `run` imports what its command needs, so `scepsy --help`
loads no solver, simulator or server. `gateway` and `engine-sim` pass their arguments to the
servers' own parsers.

Errors a user can fix are ScepsyErrors, reported by `errors.run_entry` (shared with the gateway and
the engine server): printed without traceback (exit 2 for bad input, 3 for infeasible requests, 1
otherwise) unless SCEPSY_DEBUG=1; Ctrl-C exits 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from scepsy_hpc.errors import run_entry

# in the order of `scepsy --help`; the passthrough servers come after simulate
COMMANDS = ("validate", "simulate", "trace", "predict", "profile", "plan", "topology", "daemon", "serve", "keys", "bench")
PASSTHROUGH = {"gateway": ("scepsy_hpc.gateway.server", "main"), "engine-sim": ("scepsy_hpc.engine.sim_server", "main")}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `scepsy`."""
    ap = argparse.ArgumentParser(prog="scepsy", description="Serve multi-LLM agentic workflows on Slurm GPU clusters.")
    ap.add_argument("--models", metavar="FILE", help="model catalog (default: configs/models.yaml)")
    ap.add_argument("--gpu-catalog", dest="gpu_catalog", metavar="FILE", help="GPU catalog (default: configs/gpus.yaml)")
    ap.set_defaults(json=False)  # commands with --json override it; main() reads args.json for every command
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"scepsy_hpc.commands.{name}").add_arguments(sub)
        if name == "simulate":
            sub.add_parser("gateway", add_help=False,
                           help="run the OpenAI-compatible gateway (routes by model, traces every call); --help for options")
            sub.add_parser("engine-sim", add_help=False,
                           help="run a simulated OpenAI-compatible engine server (vLLM flags); --help for options")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `scepsy` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:  # servers with their own option parsers
        module, name = PASSTHROUGH[argv[0]]
        return int(getattr(importlib.import_module(module), name)(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    # --json promises one document on stdout, failures included
    return run_entry(lambda: args.run(args), json_errors=args.json)


if __name__ == "__main__":
    sys.exit(main())
