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
COMMANDS = ("validate", "simulate", "trace", "predict", "profile", "plan", "topology", "daemon", "serve", "keys", "bench",
            "tunnel")
REMOTE_OPTIONS = ("--remote", "--remote-scepsy", "--ssh-config")   # global options `main` keeps to itself
PASSTHROUGH = {"gateway": ("scepsy_hpc.gateway.server", "main"), "engine-sim": ("scepsy_hpc.engine.sim_server", "main")}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `scepsy`."""
    ap = argparse.ArgumentParser(prog="scepsy", description="Serve multi-LLM agentic workflows on Slurm GPU clusters.")
    ap.add_argument("--models", metavar="FILE", help="model catalog (default: configs/models.yaml)")
    ap.add_argument("--gpu-catalog", dest="gpu_catalog", metavar="FILE", help="GPU catalog (default: configs/gpus.yaml)")
    ap.add_argument("--remote", metavar="HOST",
                    help="run the command on HOST (a login node; an ~/.ssh/config Host) over SSH, as if here: files "
                         "named on the command line are copied there first, output and exit status are the remote's")
    ap.add_argument("--remote-scepsy", metavar="CMD",
                    help="with --remote: how to run scepsy there (default: the host's `scepsy:` in "
                         "~/.config/scepsy/remote.yaml, else `scepsy` on the remote PATH)")
    ap.add_argument("--ssh-config", metavar="FILE", help="with --remote: the ssh config to read (default "
                    "$SCEPSY_SSH_CONFIG, else ~/.ssh/config)")
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
    if args.remote and args.command != "tunnel":   # checked here, run there
        return run_entry(lambda: _run_remote(args, argv), json_errors=args.json)
    # --json promises one document on stdout, failures included
    return run_entry(lambda: args.run(args), json_errors=args.json)


def _run_remote(args: argparse.Namespace, argv: list[str]) -> int:
    """`scepsy --remote HOST …`: the same command line, less the remote options, run on HOST."""
    from scepsy_hpc.errors import SpecError
    from scepsy_hpc.remote.run import run_remote

    if args.command in PASSTHROUGH:
        raise SpecError(f"--remote runs scepsy commands; `{args.command}` is a server: start it on the login node")
    rest, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == args.command:
            rest.extend(argv[i:])
            break
        if a in REMOTE_OPTIONS:
            i += 2
            continue
        if a.split("=", 1)[0] not in REMOTE_OPTIONS:
            rest.append(a)
        i += 1
    return run_remote(args.remote, rest, scepsy=args.remote_scepsy, ssh_config=args.ssh_config)


if __name__ == "__main__":
    sys.exit(main())
