"""`scepsy daemon start|stop|status`: the login-node daemon that keeps deployments served.

`start` detaches (the daemon runs in its own session, logging to the state dir) and returns once its
socket answers; `--foreground` runs it here (for debugging, or inside a small CPU controller job).
`stop` stops the daemon alone: deployments, their jobs and the gateway keep serving, and the next
daemon adopts them; `stop --all` stops every deployment and the gateway first.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from scepsy_hpc.commands.argtypes import port, positive_float


def add_state_dir(p: Any) -> None:
    """--state-dir, shared by every command that talks to the daemon."""
    p.add_argument("--state-dir", metavar="DIR",
                   help="the daemon's state directory (default $SCEPSY_STATE_DIR, else ~/.scepsy/HOST)")


def add_arguments(sub: Any) -> None:
    """The `daemon` subcommand."""
    d = sub.add_parser("daemon", help="start, stop or show the login-node daemon that keeps deployments served")
    dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    st = dsub.add_parser("start", help="start the daemon (detached; refuses when one runs)")
    st.add_argument("--foreground", action="store_true", help="run in this process (logs on stderr) until SIGTERM/Ctrl-C")
    st.add_argument("--poll", type=positive_float, metavar="S",
                    help="seconds between reconcile cycles (default 1 with local deployments, 10 with Slurm ones)")
    st.add_argument("--gateway-host", default="127.0.0.1", help="the gateway's listen address (default 127.0.0.1)")
    st.add_argument("--gateway-port", type=port, default=None, metavar="P",
                    help="the gateway's port (default: a free one, kept in the state for every later start)")
    st.add_argument("--trace", action="store_true", help="the gateway writes every call to STATE/gateway/traces/gateway-UTC-PID.jsonl (one file per gateway start)")
    st.add_argument("--json", action="store_true", help="print the daemon's status as one JSON object")
    add_state_dir(st)
    sp = dsub.add_parser("stop", help="stop the daemon (deployments and the gateway keep serving unless --all)")
    sp.add_argument("--all", action="store_true", help="stop every deployment and the gateway too")
    sp.add_argument("--timeout", type=positive_float, default=180.0, metavar="S", help="wait this long (default 180 s)")
    add_state_dir(sp)
    ss = dsub.add_parser("status", help="the daemon's pid, uptime, socket, deployments and Slurm calls per minute")
    ss.add_argument("--json", action="store_true", help="print one JSON object")
    add_state_dir(ss)
    d.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """`scepsy daemon ACTION`."""
    from scepsy_hpc.service.paths import StatePaths

    paths = StatePaths.of(args.state_dir)
    if args.action == "start":
        return _start(args, paths)
    if args.action == "stop":
        return _stop(args, paths)
    return _status(args, paths)


def _start(args: argparse.Namespace, paths: Any) -> int:
    if args.foreground:
        from scepsy_hpc.service.daemon import main

        argv = ["--state-dir", str(paths.root), "--gateway-host", args.gateway_host]
        argv += ["--poll", str(args.poll)] if args.poll else []
        argv += ["--gateway-port", str(args.gateway_port)] if args.gateway_port else []
        argv += ["--trace"] if args.trace else []
        return main(argv)
    from scepsy_hpc.service.launch import start_daemon

    doc = start_daemon(paths, poll_s=args.poll, gateway_host=args.gateway_host, gateway_port=args.gateway_port,
                       trace=args.trace)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"scepsy daemon {doc['pid']} running for {doc['state_dir']}; gateway {doc['gateway']['url']}; "
              f"log {doc['log']}")
    return 0


def _stop(args: argparse.Namespace, paths: Any) -> int:
    from scepsy_hpc.service.launch import stop_daemon

    pid = stop_daemon(paths, everything=args.all, timeout_s=args.timeout)
    print(f"scepsy daemon {pid} stopped" + ("; every deployment and the gateway stopped too" if args.all
                                           else "; deployments and the gateway keep serving (`scepsy daemon start` adopts them)"))
    return 0


def _status(args: argparse.Namespace, paths: Any) -> int:
    from scepsy_hpc.service.client import DaemonClient

    doc = DaemonClient(paths).request("GET", "/v1/daemon")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    gw = doc["gateway"]
    print(f"daemon pid {doc['pid']}, up {doc['uptime_s']:.0f} s, scepsy {doc['version']}\n"
          f"  state dir {doc['state_dir']} (socket {doc['socket']}, log {doc['log']})\n"
          f"  {doc['deployments']} deployment(s), {doc['serving']} serving; backends {', '.join(doc['backend'])}; "
          f"poll every {doc['poll_s']:g} s; {doc['slurm_calls_last_minute']} Slurm call(s) in the last minute\n"
          f"  gateway {gw['url']} (pid {gw['pid']}, {'alive' if gw['alive'] else 'NOT RUNNING'})")
    return 0
