"""`scepsy --remote HOST tunnel NAME`: a local port forwarded over SSH to deployment NAME's gateway on the login node.

Calls to `http://127.0.0.1:P/d/NAME/v1` on this machine reach the gateway as if made on the login node; they
still need the deployment's key (`scepsy --remote HOST keys show NAME`). Runs until Ctrl-C or SIGTERM, which
close it cleanly (exit 0); a lost SSH connection is re-established (`remote.tunnel`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from scepsy_hpc.commands.argtypes import port


def add_arguments(sub: Any) -> None:
    """The `tunnel` subcommand."""
    t = sub.add_parser("tunnel", help="forward a local port to a deployment's gateway on the login node (--remote HOST)",
                       description="Forward a local port over SSH to deployment NAME's gateway on the login node "
                                   "(`scepsy --remote HOST tunnel NAME`), until Ctrl-C. Many connections and streams "
                                   "share the one SSH connection; a lost connection is re-established. Calls still "
                                   "need the deployment's key: `scepsy --remote HOST keys show NAME`.")
    t.add_argument("name", metavar="NAME", help="deployment name (as `scepsy --remote HOST ls` lists it)")
    t.add_argument("--local-port", type=port, default=0, metavar="P",
                   help="the local port to listen on (default 0: a free one, printed)")
    t.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="the local address to listen on (default 127.0.0.1; any other address lets whoever reaches "
                        "it reach the gateway)")
    t.add_argument("--json", action="store_true",
                   help="print one JSON object once the tunnel is ready (local_url, local_port, remote, gateway)")
    t.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Open the tunnel, say where it listens, forward until Ctrl-C/SIGTERM."""
    import signal
    import sys
    import threading

    from scepsy_hpc.errors import ScepsyError, SpecError
    from scepsy_hpc.remote import ssh
    from scepsy_hpc.remote.run import remote_scepsy
    from scepsy_hpc.remote.tunnel import Tunnel, check_bind, find_gateway, local_url

    host = args.remote
    if not host:
        raise SpecError(f"tunnel {args.name}: give the login node with --remote HOST (`scepsy --remote HOST tunnel "
                        f"{args.name}`); the tunnel forwards a local port to the gateway there over SSH")
    loopback = check_bind(args.bind)
    target = ssh.resolve(host, config_file=args.ssh_config)
    scepsy = remote_scepsy(host, args.remote_scepsy)
    found: list[Any] = []

    def locate(conn: ssh.Connection) -> tuple[str, int]:
        gw = find_gateway(conn, args.name, scepsy)
        found.append(gw)
        return gw.address

    def say(line: str) -> None:
        sys.stderr.write(line + "\n")   # one write: lines said from several threads do not interleave
        sys.stderr.flush()

    tunnel = Tunnel(lambda: ssh.open_connection(target), locate, bind=(args.bind, args.local_port), say=say)
    stop = threading.Event()
    previous: dict[int, Any] = {}
    try:
        address = tunnel.start()   # Ctrl-C here is a plain interrupt (exit 130): nothing is listening yet
        # from now on a signal ends the tunnel cleanly, whichever thread is busy
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        gw = found[-1]
        url = local_url(address, gw.path)
        keys = f"scepsy --remote {host} keys show {args.name}"
        if args.json:
            print(json.dumps({"name": args.name, "local_url": url, "local_port": address[1], "remote": host,
                              "gateway": gw.base_url, "key_command": keys}), flush=True)
        say(f"tunnel: {url} → {gw.base_url} on {host} (deployment {args.name}, {gw.state}); Ctrl-C closes it")
        say(f"  every call needs its key: export OPENAI_API_KEY=$({keys}) OPENAI_BASE_URL={url}")
        if not loopback:
            say(f"tunnel: listening on {address[0]}:{address[1]}, not loopback: anyone who can reach that address "
                f"reaches {args.name}'s gateway (its calls still need a key)")
        try:
            tunnel.run(stop)
        except ScepsyError as e:
            if not args.json:
                raise
            say(f"error: {e}")   # stdout already holds the one document --json promised
            return e.exit_code
    finally:
        tunnel.close()
        for s, h in previous.items():
            signal.signal(s, h)
    say("tunnel closed")
    return 0
