"""The gateway's own Prometheus metrics: a collector that reads the gateway's live state at each scrape.

Families are built from the state when scraped (no instrument is updated on the request path), so
the exposed names are exactly these (prometheus_client's own Counter would add `_created` series)
and each app has its own registry, never the process-wide default: tests run several gateways in
one process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from scepsy_hpc.gateway.endpoints import EndpointsWatcher

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
        for p in pools:
            queue.add_metric([p.name], p.queue_length())
        yield from (calls, errors, outstanding, replica_calls, caps, queue)
        yield GaugeMetricFamily("scepsy_gateway_open_spans", "Spans started and not yet ended.",
                                value=st.spans.open_count())
        yield CounterMetricFamily("scepsy_gateway_spans_total", "Request and tool spans recorded.",
                                  value=st.span_records)
        if isinstance(st.source, EndpointsWatcher):
            yield CounterMetricFamily("scepsy_gateway_endpoints_reloads_total",
                                      "Successful reloads of the endpoints file.", value=st.source.reloads)


def gateway_registry(state: GatewayState) -> CollectorRegistry:
    """A registry holding this gateway's collector alone."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(state))
    return registry
