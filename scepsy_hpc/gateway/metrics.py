"""The gateway's own metrics: a Prometheus collector that reads the gateway's live state at each scrape,
and the JSON stats of `GET /scepsy/v1/stats` (recent rates and latencies, for `scepsy status --watch`).

Families are built from the state when scraped (no instrument is updated on the request path), so
the exposed names are exactly these (prometheus_client's own Counter would add `_created` series)
and each app has its own registry, never the process-wide default: tests run several gateways in
one process.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from scepsy_hpc.gateway.endpoints import EndpointsWatcher
from scepsy_hpc.trace.records import CallRecord

if TYPE_CHECKING:
    from scepsy_hpc.gateway.app import GatewayState


class GatewayCollector(Collector):
    """Calls, errors, per-replica load and caps, queues and spans of one gateway, as they stand now."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        """The metric families (the router is not synced here: the handler does that first)."""
        st = self.state
        pools = st.router.pools()
        calls = CounterMetricFamily("scepsy_gateway_calls_total", "LLM calls received, per LLM.", labels=["llm"])
        for name, n in sorted(st.calls.items()):
            calls.add_metric([name], n)
        errors = CounterMetricFamily("scepsy_gateway_errors_total", "LLM calls that ended in an error, per LLM.",
                                     labels=["llm"])
        for name, n in sorted(st.errors.items()):
            errors.add_metric([name], n)
        per_replica = ["llm", "replica"]
        outstanding = GaugeMetricFamily("scepsy_gateway_outstanding", "Calls in flight at each replica.",
                                        labels=per_replica)
        replica_calls = CounterMetricFamily("scepsy_gateway_replica_calls_total",
                                            "Calls sent to each replica (failover attempts included).",
                                            labels=per_replica)
        caps = GaugeMetricFamily("scepsy_gateway_max_outstanding", "Cap on calls in flight at each replica.",
                                 labels=per_replica)
        for p in pools:
            for r in p.replicas:
                outstanding.add_metric([p.name, r.url], r.outstanding)
                replica_calls.add_metric([p.name, r.url], r.calls)
                caps.add_metric([p.name, r.url], r.cap)
        queue = GaugeMetricFamily("scepsy_gateway_queue_length",
                                  "Calls waiting because every replica of the LLM is full.", labels=["llm"])
        held = GaugeMetricFamily("scepsy_gateway_held",
                                 "Calls holding because no replica of the LLM can take them (none, or all down).",
                                 labels=["llm"])
        for p in pools:
            queue.add_metric([p.name], p.queue_length())
            held.add_metric([p.name], p.held_count())
        held_calls = CounterMetricFamily("scepsy_gateway_held_calls_total",
                                         "Calls that had to hold for a replica, per LLM.", labels=["llm"])
        for name, n in sorted(st.router.held_calls.items()):
            held_calls.add_metric([name], n)
        hold_timeouts = CounterMetricFamily("scepsy_gateway_hold_timeouts_total",
                                            "Held calls that failed when their hold ran out, per LLM.", labels=["llm"])
        for name, n in sorted(st.router.hold_timeouts.items()):
            hold_timeouts.add_metric([name], n)
        draining = GaugeMetricFamily("scepsy_gateway_draining_outstanding",
                                     "Calls in flight at replicas removed from the endpoints file.", labels=per_replica)
        for r in st.router.draining():
            draining.add_metric([r.llm, r.url], r.outstanding)
        yield from (calls, errors, outstanding, replica_calls, caps, queue, held, held_calls, hold_timeouts, draining)
        yield GaugeMetricFamily("scepsy_gateway_open_spans", "Spans started and not yet ended.",
                                value=st.spans.open_count())
        yield CounterMetricFamily("scepsy_gateway_spans_total", "Request and tool spans recorded.",
                                  value=st.span_records)
        yield CounterMetricFamily("scepsy_gateway_spans_dropped_total",
                                  "Open spans dropped unended (too old, or too many open).", value=st.spans.dropped)
        yield from _cap_families(st)
        if isinstance(st.source, EndpointsWatcher):
            yield CounterMetricFamily("scepsy_gateway_endpoints_reloads_total",
                                      "Successful reloads of the endpoints file.", value=st.source.reloads)
        yield from _guard_families(st)


def _guard_families(st: GatewayState) -> Iterable[Metric]:
    """Refused inputs and client keys: by reason, and per key id (never key material)."""
    refused = CounterMetricFamily("scepsy_gateway_refused_total",
                                  "Requests refused by the gateway's bounds (body too large, client too slow, bad JSON, "
                                  "client gone mid-body).", labels=["reason"])
    for reason, n in sorted(st.refusals.items()):
        refused.add_metric([reason], n)
    unauthorized = CounterMetricFamily("scepsy_gateway_unauthorized_total",
                                       "Requests refused with 401: no key, a malformed Authorization, or a key "
                                       "unknown or revoked.", labels=["reason"])
    for reason, n in sorted(st.keys.unauthorized.items()):
        unauthorized.add_metric([reason], n)
    key_calls = CounterMetricFamily("scepsy_gateway_key_calls_total", "LLM calls admitted, per client key id.",
                                    labels=["key"])
    key_refused = CounterMetricFamily("scepsy_gateway_key_refused_total",
                                      "Calls to an LLM outside the key's deployments, per client key id.",
                                      labels=["key"])
    key_limited = CounterMetricFamily("scepsy_gateway_key_rate_limited_total",
                                      "Calls refused with 429, per client key id and limit (max_concurrent, rpm).",
                                      labels=["key", "limit"])
    key_in_flight = GaugeMetricFamily("scepsy_gateway_key_in_flight", "LLM calls in flight, per client key id.",
                                      labels=["key"])
    for kid, use in sorted(st.keys.uses.items()):
        key_calls.add_metric([kid], use.calls)
        key_refused.add_metric([kid], use.refused)
        key_in_flight.add_metric([kid], use.in_flight)
        for limit, n in sorted(use.rate_limited.items()):
            key_limited.add_metric([kid, limit], n)
    yield from (refused, unauthorized, key_calls, key_refused, key_limited, key_in_flight)


def _cap_families(st: GatewayState) -> Iterable[Metric]:
    """The request caps (admission.py), per capped deployment ("" for the LLMs with no deployment)."""
    per = ["deployment"]
    cap = GaugeMetricFamily("scepsy_gateway_max_requests", "Request cap: workflow requests in flight at once.",
                            labels=per)
    in_flight = GaugeMetricFamily("scepsy_gateway_requests_in_flight", "Workflow requests admitted and not ended.",
                                  labels=per)
    waiting = GaugeMetricFamily("scepsy_gateway_requests_waiting", "Workflow requests waiting under the cap.",
                                labels=per)
    counters = {k: CounterMetricFamily(f"scepsy_gateway_requests_{k}_total", doc, labels=per) for k, doc in (
        ("admitted", "Workflow requests admitted under the cap."),
        ("waited", "Workflow requests that had to wait for a slot (admitted or not)."),
        ("wait_timeouts", "Calls refused (503) after waiting request_wait_s."),
        ("queue_full", "Calls refused (503) at once: too many requests or calls already waiting."),
        ("idle_ended", "Workflow requests taken as ended after request_idle_s with no call."),
        ("readmitted", "Workflow requests let in at once after their idle end (a late call, not a new request)."))}
    for dep, figs in st.admission.stats().items():
        cap.add_metric([dep], figs["max_requests"])
        in_flight.add_metric([dep], figs["in_flight"])
        waiting.add_metric([dep], figs["waiting"])
        for k, fam in counters.items():
            fam.add_metric([dep], figs[k])
    yield from (cap, in_flight, waiting, *counters.values())
    yield CounterMetricFamily("scepsy_gateway_uncapped_calls_total",
                              "Calls to a capped deployment without a request id (not counted by the cap).",
                              value=st.admission.uncapped_calls)


def gateway_registry(state: GatewayState) -> CollectorRegistry:
    """A registry holding this gateway's collector alone."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(state))
    return registry


STATS_WINDOW_S = 60.0
STATS_WINDOW_MAX_CALLS = 10_000


class CallWindow:
    """The completed calls of one LLM in the last `window_s` wall seconds, at most `max_calls` of them.

    Each entry is (monotonic end, ok, latency, ttft); latencies are the trace's model seconds.
    Old entries leave on every `add` and `summary`, so memory is bounded by both limits; past
    `max_calls` in a window the rate and means are those of the newest `max_calls` calls."""

    def __init__(self, window_s: float = STATS_WINDOW_S, max_calls: int = STATS_WINDOW_MAX_CALLS) -> None:
        self.window_s = window_s
        self._calls: deque[tuple[float, bool, float, float | None]] = deque(maxlen=max_calls)
        self._evicted_end = float("-inf")  # end of the newest call pushed out by the cap, not by age

    def _prune(self, now: float) -> None:
        calls, oldest = self._calls, now - self.window_s
        while calls and calls[0][0] < oldest:
            calls.popleft()

    def add(self, now: float, rec: CallRecord) -> None:
        """Count one finished call (`now` in monotonic seconds)."""
        self._prune(now)
        if len(self._calls) == self._calls.maxlen:
            self._evicted_end = self._calls[0][0]
        ttft = rec.t_first - rec.t_start if rec.t_first is not None else None
        self._calls.append((now, rec.status == "ok", rec.t_end - rec.t_start, ttft))

    def summary(self, now: float, span_s: float) -> dict[str, float | None]:
        """Completed calls per second over the last `span_s` (≤ window) and the mean latency and TTFT of
        the successful ones (None without any)."""
        self._prune(now)
        calls = self._calls
        if self._evicted_end >= now - self.window_s:
            # The cap dropped calls of this window: the entries left cover only the time since then.
            span_s = min(span_s, max(now - self._evicted_end, 1e-3))
        lat = [c[2] for c in calls if c[1]]
        ttft = [t for _, ok, _, t in calls if ok and t is not None]
        return {"rate_rps_60s": len(calls) / span_s,
                "latency_mean_s_60s": sum(lat) / len(lat) if lat else None,
                "ttft_mean_s_60s": sum(ttft) / len(ttft) if ttft else None}


def gateway_stats(state: GatewayState) -> dict[str, Any]:
    """`GET /scepsy/v1/stats`: uptime, per LLM key its counters, load, replicas and last minute, and the
    replicas still draining, spans, refused inputs and client keys.

    `{"uptime_s", "time_scale", "models": {key: {"calls", "errors", "outstanding", "queued", "held",
    "held_calls", "hold_timeouts", "replicas", "replicas_up", "replica_states", "rate_rps_60s",
    "latency_mean_s_60s", "ttft_mean_s_60s"}}, "draining": {url: outstanding}}`: calls and errors
    since start; outstanding (at the replicas in the endpoints file), queued (for a slot of a full
    replica) and held (for any replica: none in the file, or all down) now; held_calls and
    hold_timeouts since start; replicas counts those in the endpoints file, replicas_up those of them
    not marked down by a refused connection; replica_states lists `{"url", "outstanding", "active",
    "down", "weight", "calls"}` for each replica in the file (active true) and each removed one still
    draining (active false): its routing weight (the file's, 1 for like replicas) and the calls routed to it
    since it joined (a retry elsewhere after a refused connection counts at both), so capacity-weighted
    routing can be read off a live gateway; `draining` maps every removed replica with calls in flight (streams included) to their
    number, so a replica is done once its URL leaves it. The rate (completed calls, per wall second)
    divides by the window, or by the uptime while that is shorter (at least 1 s); the means (model
    seconds, of successful calls; TTFT of streams only) are null without such calls. `spans`: open and
    dropped (unended, too old or too many) spans; `refused`: inputs refused by a bound, by reason;
    `auth`: `{"enabled", "keys", "unauthorized": {reason: n}, "per_key": {id: {"calls", "in_flight",
    "refused", "rate_limited": {limit: n}}}}` (key ids only, never keys). `requests`: per capped deployment
    ("" for the LLMs with no deployment) `{"max_requests", "in_flight", "waiting", "admitted", "waited",
    "wait_timeouts", "queue_full", "idle_ended", "readmitted"}` (admission.py), and `uncapped_calls`."""
    st = state
    now = time.monotonic()
    uptime_s = now - st.started
    span_s = max(1.0, min(STATS_WINDOW_S, uptime_s))
    models: dict[str, Any] = {}
    pools = st.router.pools()
    for gone in set(st.windows) - {p.name for p in pools}:
        del st.windows[gone]  # an LLM removed from the endpoints file
    for p in pools:
        window = st.windows.get(p.name)
        recent = window.summary(now, span_s) if window is not None else {
            "rate_rps_60s": 0.0, "latency_mean_s_60s": None, "ttft_mean_s_60s": None}
        models[p.name] = {"calls": st.calls.get(p.name, 0), "errors": st.errors.get(p.name, 0),
                          "outstanding": sum(r.outstanding for r in p.replicas), "queued": p.queue_length(),
                          "held": p.held_count(), "held_calls": st.router.held_calls.get(p.name, 0),
                          "hold_timeouts": st.router.hold_timeouts.get(p.name, 0),
                          "replicas": len(p.replicas), "replicas_up": sum(1 for r in p.replicas if r.down_until <= now),
                          "replica_states": [{"url": r.url, "outstanding": r.outstanding, "active": r.active,
                                              "down": r.down_until > now, "weight": r.weight, "calls": r.calls}
                                             for r in st.router.replica_states(p)],
                          **recent}
    draining: dict[str, int] = {}
    for r in st.router.draining():
        draining[r.url] = draining.get(r.url, 0) + r.outstanding
    return {"uptime_s": uptime_s, "time_scale": st.time_scale, "models": models, "draining": draining,
            "spans": {"open": st.spans.open_count(), "dropped": st.spans.dropped},
            "refused": dict(sorted(st.refusals.items())), "auth": st.keys.stats(),
            "requests": st.admission.stats(), "uncapped_calls": st.admission.uncapped_calls}
