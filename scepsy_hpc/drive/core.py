"""What every driver shares: per-request results, span events sent to the gateway, arrival processes.

Times: a drive paces in *wall* seconds but reports *model* seconds (wall / time_scale), the clock
of the trace (scepsy_hpc/trace/records.py), so that runs at any time scale compare.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

SPANS_PATH = "/scepsy/v1/spans"
REQUEST_HEADER = "X-Scepsy-Request"
ROLE_HEADER = "X-Scepsy-Role"
# Connections the one aiohttp session may hold open: high enough for wide fan-outs at a high rate,
# below the usual `ulimit -n` of 1024 so a drive never runs out of file descriptors.
MAX_CONNECTIONS = 900


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One driven request: status, latency in model seconds, calls issued (None if unknown), errors."""

    request: str
    status: str
    latency_s: float
    n_calls: int | None = None
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class DriveResult:
    """The outcome of one drive: results keyed by request id (in issue order), duration in model seconds."""

    requests: dict[str, RequestResult]
    duration_s: float
    time_scale: float = 1.0
    spans_reported: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_ok(self) -> int:
        """Requests that finished without an error."""
        return sum(1 for r in self.requests.values() if r.status == "ok")

    @property
    def n_error(self) -> int:
        """Requests with at least one error."""
        return len(self.requests) - self.n_ok

    def errors(self) -> list[str]:
        """Every error, prefixed by its request id."""
        return [f"{r.request}: {e}" for r in self.requests.values() for e in r.errors]

    def summary(self) -> str:
        """One line: counts, mean latency and achieved rate (model time)."""
        lat = sorted(r.latency_s for r in self.requests.values())
        mean = sum(lat) / len(lat) if lat else 0.0
        rate = len(lat) / self.duration_s if self.duration_s > 0 else 0.0
        return (f"{len(lat)} requests ({self.n_error} failed) in {self.duration_s:.2f} s model time; "
                f"mean latency {mean:.3f} s, {rate:.3f} req/s")


def request_id(prefix: str, i: int) -> str:
    """The id of request `i` of a drive."""
    return f"{prefix}-{i:06d}"


class SpanReporter:
    """Posts request and tool span events to the gateway, which stamps their times.

    A 404 or 405 means the base URL is a bare engine rather than a gateway: reporting then turns
    itself off for the rest of the drive and no error is recorded.
    """

    def __init__(self, session: Any, base_url: str, enabled: bool = True) -> None:
        self.session = session
        self.url = base_url + SPANS_PATH
        self.enabled = enabled

    async def event(self, span: str, event: str, request: str, name: str | None = None, *,
                    ident: str | None = None, status: str = "ok", error: str | None = None,
                    errors: list[str] | None = None) -> None:
        """Send one start/end event; a failure is appended to `errors` (if given) instead of raised.

        `ident` pairs the start and end of one of several concurrent spans of the same name (the
        gateway pairs the others first-in first-out); status and error go with the end event only.
        """
        if not self.enabled:
            return
        body: dict[str, Any] = {"span": span, "event": event, "request": request}
        if name is not None:
            body["name"] = name
        if ident is not None:
            body["id"] = ident
        if event == "end":
            body["status"] = status
            if error is not None:
                body["error"] = error[:500]
        try:
            async with self.session.post(self.url, json=body) as resp:
                if resp.status in (404, 405):
                    self.enabled = False
                elif resp.status >= 400:
                    text = (await resp.text())[:200]
                    _note(errors, f"span {span}/{event} rejected: HTTP {resp.status}: {text}")
                else:
                    await resp.read()
        except Exception as exc:  # noqa: BLE001 - any transport failure is reported, the drive goes on
            _note(errors, f"span {span}/{event} not sent: {type(exc).__name__}: {exc}")


def _note(errors: list[str] | None, msg: str) -> None:
    if errors is not None:
        errors.append(msg)


async def run_arrivals(run_one: Callable[[int], Awaitable[RequestResult]], n_requests: int, *,
                       rate_rps: float | None, concurrency: int | None, seed: int,
                       time_scale: float) -> tuple[list[RequestResult], float]:
    """Run requests 0..n-1 open-loop (Poisson at `rate_rps`, model time) or closed-loop (`concurrency` in flight).

    Returns the results in request order and the wall seconds the drive took.
    """
    if n_requests < 0:
        raise ValueError(f"n_requests must be >= 0, got {n_requests}")
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    t0 = time.monotonic()
    if rate_rps is not None:
        if rate_rps <= 0:
            raise ValueError(f"rate_rps must be > 0, got {rate_rps}; omit it for a closed loop")
        results = await _open_loop(run_one, n_requests, rate_rps, seed, time_scale)
    else:
        c = 1 if concurrency is None else concurrency
        if c < 1:
            raise ValueError(f"concurrency must be >= 1, got {c}")
        results = await _closed_loop(run_one, n_requests, c)
    return results, time.monotonic() - t0


async def _open_loop(run_one: Callable[[int], Awaitable[RequestResult]], n: int, rate_rps: float,
                     seed: int, time_scale: float) -> list[RequestResult]:
    rng = random.Random(f"{seed}/arrivals")
    loop = asyncio.get_running_loop()
    start = loop.time()
    t_model = 0.0
    tasks: list[asyncio.Task[RequestResult]] = []
    for i in range(n):
        if i > 0:
            t_model += rng.expovariate(rate_rps)
        # Sleep to an absolute target so that scheduling delays do not accumulate into a lower rate.
        delay = start + t_model * time_scale - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(run_one(i)))
    return list(await asyncio.gather(*tasks))


async def _closed_loop(run_one: Callable[[int], Awaitable[RequestResult]], n: int,
                       concurrency: int) -> list[RequestResult]:
    results: list[RequestResult | None] = [None] * n
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            results[i] = await run_one(i)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    return [r for r in results if r is not None]


def make_session(limit: int = MAX_CONNECTIONS, api_key: str | None = None) -> Any:
    """The drive's one aiohttp session: no total timeout (generations can be long), many connections; with
    `api_key`, every call (spans included) carries `Authorization: Bearer` (the gateway's client key)."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
                                 headers=auth_headers(api_key))


def auth_headers(api_key: str | None) -> dict[str, str]:
    """`Authorization: Bearer KEY`, or nothing without a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def normalize_base(url: str) -> str:
    """A server root URL: no trailing slash, no trailing /v1 (both are accepted for convenience)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url
