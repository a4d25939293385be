"""The gateway as a server: listening (`start_gateway`, the `Gateway` handle), serving until a signal
(`run_gateway`, with a pid file), and `python -m scepsy_hpc.gateway`'s command line. The application
itself (routes, handlers, state) is `gateway/app.py`."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
from pathlib import Path
from typing import IO, Sequence

from aiohttp import web

from scepsy_hpc.errors import ScepsyError, SpecError, run_entry
from scepsy_hpc.gateway.app import (DEFAULT_CLIENT_TIMEOUT_S, DEFAULT_HOLD_S, DEFAULT_MAX_BODY_MIB,
                                    DEFAULT_PREFIX_AFFINITY, MAX_BODY_BYTES, STATE, GatewayState, make_app)
from scepsy_hpc.gateway.endpoints import EndpointsWatcher
from scepsy_hpc.gateway.guard import MAX_HEADER_BYTES, MAX_HEADERS, MAX_LINE_BYTES, GuardedRunner
from scepsy_hpc.gateway.names import listing
from scepsy_hpc.gateway.tracing import open_trace
from scepsy_hpc.perf.prefix import DEFAULT_AFFINITY_RATIO, DEFAULT_AFFINITY_SLACK
from scepsy_hpc.spec.records import write_atomic
from scepsy_hpc.trace.records import TraceWriter

log = logging.getLogger("scepsy_hpc.gateway")


class Gateway:
    """A gateway serving in this process's event loop."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, trace_file: IO[str] | None) -> None:
        self.runner = runner
        self.host = host
        self.port = port
        self._trace_file = trace_file
        self._closed = False

    @property
    def url(self) -> str:
        """Base URL (clients use url + "/v1")."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def state(self) -> GatewayState:
        """The app's state (router, counters)."""
        return self.runner.app[STATE]

    async def close(self) -> None:
        """Stop serving and flush the trace (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        await self.runner.cleanup()
        if self._trace_file is not None:
            self._trace_file.close()
            self._trace_file = None

    async def __aenter__(self) -> "Gateway":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def start_gateway(endpoints_path: str | Path, trace_path: str | Path | None = None, host: str = "127.0.0.1",
                        port: int = 0, time_scale: float | None = None, *, connect_timeout_s: float = 5.0,
                        watch_interval_s: float = 0.2, shutdown_timeout_s: float = 30.0, down_for_s: float = 1.0,
                        hold_s: float = DEFAULT_HOLD_S, max_body_bytes: int = MAX_BODY_BYTES,
                        client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S, append_trace: bool = False,
                        prefix_affinity: bool = DEFAULT_PREFIX_AFFINITY) -> Gateway:
    """Load the endpoints file and serve; time_scale None takes the file's, else 1.0. Port 0 picks a free one.

    The trace file is created 0600 and must be new or empty (one trace per run), unless `append_trace`:
    then this run's calls are numbered on from the file's last call id. `close()` lets calls in flight
    finish for up to `shutdown_timeout_s`."""
    watcher = EndpointsWatcher(endpoints_path, min_interval_s=watch_interval_s)
    eps = watcher.load()
    scale = time_scale if time_scale is not None else (eps.time_scale or 1.0)
    trace_file: IO[str] | None = None
    writer = None
    last_call = 0
    if trace_path is not None:
        trace_file, last_call = open_trace(trace_path, append=append_trace)
        writer = TraceWriter(trace_file)
    app = make_app(watcher, writer, scale, connect_timeout_s=connect_timeout_s, down_for_s=down_for_s, hold_s=hold_s,
                   max_body_bytes=max_body_bytes, client_timeout_s=client_timeout_s, prefix_affinity=prefix_affinity)
    app[STATE].continue_call_ids(last_call)
    # keepalive_timeout also closes a connection that has not sent a whole request line and headers in time.
    runner = GuardedRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout_s,
                           keepalive_timeout=client_timeout_s, max_line_size=MAX_LINE_BYTES,
                           max_field_size=MAX_HEADER_BYTES, max_headers=MAX_HEADERS)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if trace_file is not None:
            trace_file.close()
        raise ScepsyError(f"gateway cannot listen on {host}:{port}: {_bind_reason(exc)}") from None
    bound = runner.addresses[0][1] if runner.addresses else port  # the real port when port=0
    return Gateway(runner, host, bound, trace_file)


def _bind_reason(exc: OSError) -> str:
    """Why binding failed, in a few words (asyncio wraps the errno in a long sentence with the address)."""
    if isinstance(exc.errno, int) and exc.errno > 0:
        reason = os.strerror(exc.errno).lower()
        if exc.errno == errno.EADDRINUSE:
            reason += " (another process listens there: stop it or choose another --port)"
        return reason
    return exc.strerror or str(exc)  # e.g. a host name that does not resolve


def _write_pid_file(path: Path) -> None:
    try:
        write_atomic(path, f"{os.getpid()}\n")
    except OSError as exc:
        raise ScepsyError(f"{path}: cannot write the pid file: {exc.strerror or exc}") from None


def _remove_pid_file(path: Path) -> None:
    """Remove the pid file if it still names this process (a successor may have replaced it)."""
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


async def _serve(endpoints_path: str | Path, trace_path: str | Path | None, host: str, port: int,
                 time_scale: float | None, pid_file: str | Path | None = None, hold_s: float = DEFAULT_HOLD_S,
                 max_body_bytes: int = MAX_BODY_BYTES, client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S,
                 prefix_affinity: bool = DEFAULT_PREFIX_AFFINITY) -> None:
    gw = await start_gateway(endpoints_path, trace_path, host, port, time_scale, hold_s=hold_s,
                             max_body_bytes=max_body_bytes, client_timeout_s=client_timeout_s,
                             prefix_affinity=prefix_affinity)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    st = gw.state
    try:
        if pid_file is not None:  # after binding, so a pid file means the port answers
            _write_pid_file(Path(pid_file))
        log.info("gateway serving %s on %s/v1 (time scale %g)%s", listing(st.router.names()), gw.url,
                 st.time_scale, f", tracing to {trace_path}" if trace_path else "")
        await stop.wait()
    finally:
        await gw.close()
        if pid_file is not None:
            _remove_pid_file(Path(pid_file))
        log.info("gateway stopped")


def run_gateway(endpoints_path: str | Path, trace_path: str | Path | None = None, host: str = "127.0.0.1",
                port: int = 8000, time_scale: float | None = None, *, pid_file: str | Path | None = None,
                hold_s: float = DEFAULT_HOLD_S, max_body_bytes: int = MAX_BODY_BYTES,
                client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S,
                prefix_affinity: bool = DEFAULT_PREFIX_AFFINITY) -> None:
    """Serve until SIGINT/SIGTERM (blocking); `pid_file` holds this process's id while the port is bound."""
    asyncio.run(_serve(endpoints_path, trace_path, host, port, time_scale, pid_file, hold_s, max_body_bytes,
                       client_timeout_s, prefix_affinity))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The gateway's command-line options (also used by `scepsy gateway`)."""
    p = parser or argparse.ArgumentParser(
        prog="scepsy gateway",
        description="OpenAI-compatible gateway for the LLMs of one or more deployments; traces every call.")
    p.add_argument("--endpoints", required=True, help="endpoints file (YAML or JSON); reloaded when it changes")
    p.add_argument("--trace", default=None,
                   help="write call and span records to this JSONL file (created 0600; must be new or empty)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--time-scale", type=float, default=None,
                   help="the engines' time scale, so trace times are model seconds (default: the file's, else 1)")
    p.add_argument("--hold-s", type=float, default=DEFAULT_HOLD_S,
                   help="seconds a call waits for a replica of its LLM when none can take it (engines restarting, "
                        f"a cut-over) before failing with 503 (default {DEFAULT_HOLD_S:g}; 0 fails at once)")
    p.add_argument("--max-body-mib", type=float, default=DEFAULT_MAX_BODY_MIB,
                   help=f"largest request body in MiB; larger ones get 413 (default {DEFAULT_MAX_BODY_MIB:g})")
    p.add_argument("--client-timeout-s", type=float, default=DEFAULT_CLIENT_TIMEOUT_S,
                   help="seconds a client may take to send its request, and an idle connection stays open "
                        f"(default {DEFAULT_CLIENT_TIMEOUT_S:g})")
    p.add_argument("--prefix-affinity", action=argparse.BooleanOptionalAction, default=DEFAULT_PREFIX_AFFINITY,
                   help="send a request's calls to an LLM to the replica that served its previous one (its prompt "
                        f"prefix is cached there) unless that replica is full, or busier than the least-loaded one "
                        f"by over {DEFAULT_AFFINITY_SLACK} calls and over {DEFAULT_AFFINITY_RATIO:g}× "
                        f"(default {'on' if DEFAULT_PREFIX_AFFINITY else 'off'})")
    p.add_argument("--pid-file", default=None,
                   help="write this process's id here once the port is bound; removed on a clean exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log reloads and debug detail")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m scepsy_hpc.gateway`; returns the exit status."""
    args = build_parser().parse_args(argv)

    def serve() -> None:
        if args.time_scale is not None and not 0 < args.time_scale < float("inf"):   # also refuses nan
            raise SpecError(f"--time-scale {args.time_scale:g}: the time scale must be a positive number")
        if not 0 <= args.port <= 65535:
            raise SpecError(f"--port {args.port}: give a port from 1 to 65535, or 0 for a free one")
        if not 0 <= args.hold_s < float("inf"):
            raise SpecError(f"--hold-s {args.hold_s:g}: give 0 (fail at once) or a finite number of seconds")
        if not 0 < args.max_body_mib <= 1024:
            raise SpecError(f"--max-body-mib {args.max_body_mib:g}: give a size in MiB above 0 and at most 1024")
        if not 0 < args.client_timeout_s <= 3600:
            raise SpecError(f"--client-timeout-s {args.client_timeout_s:g}: give seconds above 0 and at most 3600")
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run_gateway(args.endpoints, args.trace, args.host, args.port, args.time_scale, pid_file=args.pid_file,
                    hold_s=args.hold_s, max_body_bytes=int(args.max_body_mib * 2**20),
                    client_timeout_s=args.client_timeout_s, prefix_affinity=args.prefix_affinity)

    return run_entry(serve)
