"""Prometheus metrics of the simulated engine, under vLLM's names, exposed through prometheus_client.

Values are model seconds (the engine's virtual clock), so a gateway reading them sees what a real
engine would report whatever the time scale. Bucket boundaries are vLLM V1's. A collector yields
metric families from the live state at scrape time, which keeps the exposed names exactly vLLM's
(prometheus_client's own Counter would add `_created` series) and costs nothing between scrapes.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

# What `generate_latest` writes (the 0.0.4 text format) in every release we support; the library's
# CONTENT_TYPE_LATEST names 1.0.0 from 0.22 on, and this constant's own name only exists since then.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                  40.0, 80.0)
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class Histogram:
    """A cumulative-bucket histogram."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        """Record one value."""
        i = bisect.bisect_left(self.bounds, value)  # Prometheus buckets are `le` (upper bound inclusive)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative `(le, count)` pairs, +Inf last, as `HistogramMetricFamily.add_metric` takes them."""
        cum = list(itertools.accumulate(self.counts))
        return [(floatToGoString(b), c) for b, c in zip(self.bounds, cum)] + [("+Inf", self.n)]


class EngineMetrics:
    """The counters and histograms an engine accumulates; gauges are read at render time."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.tpot = Histogram(TPOT_BUCKETS_S)
        self.e2e = Histogram(E2E_BUCKETS_S)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success: dict[str, int] = {"length": 0, "stop": 0}
        self.lag_s = 0.0  # wall seconds iterations were handed out late, summed (the sim's own health)
        self.deliveries = 0

    def families(self, running: int, waiting: int, kv_usage: float) -> list[Metric]:
        """Every metric family, the gauges taken from the values given (the engine's state now)."""
        lab = ["model_name"]
        name = [self.model_name]

        def gauge(metric: str, help_: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(metric, help_, labels=lab)
            g.add_metric(name, value)
            return g

        def counter(metric: str, help_: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(metric, help_, labels=lab)
            c.add_metric(name, value)
            return c

        success = CounterMetricFamily("vllm:request_success_total", "Count of successfully processed requests.",
                                      labels=["finished_reason", "model_name"])
        for reason, count in self.success.items():
            success.add_metric([reason, self.model_name], count)
        out: list[Metric] = [
            gauge("vllm:num_requests_running", "Number of requests in model execution batches.", running),
            gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting),
            gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv_usage),
            counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", self.prompt_tokens),
            counter("vllm:generation_tokens_total", "Number of generation tokens processed.", self.generation_tokens),
            success,
        ]
        for metric, hist, help_ in (
            ("vllm:time_to_first_token_seconds", self.ttft, "Histogram of time to first token in seconds."),
            ("vllm:time_per_output_token_seconds", self.tpot, "Histogram of time per output token in seconds."),
            ("vllm:e2e_request_latency_seconds", self.e2e, "Histogram of e2e request latency in seconds."),
        ):
            h = HistogramMetricFamily(metric, help_, labels=lab)
            h.add_metric(name, hist.buckets(), hist.total)
            out.append(h)
        out.append(counter("scepsy_sim_delivery_lag_seconds_total",
                           "Wall seconds by which iterations were delivered later than the time scale asks, summed.",
                           self.lag_s))
        out.append(counter("scepsy_sim_iterations_delivered_total", "Iterations whose tokens were delivered.",
                           self.deliveries))
        return out


class EngineCollector(Collector):
    """A collector for the engine's own registry: reads the metrics and the engine's state at each scrape."""

    def __init__(self, metrics: EngineMetrics, state: Callable[[], tuple[int, int, float]]) -> None:
        self.metrics = metrics
        self.state = state  # () -> (running, waiting, kv usage)

    def collect(self) -> Iterable[Metric]:
        """The metric families as they stand now."""
        return self.metrics.families(*self.state())


def engine_registry(metrics: EngineMetrics, state: Callable[[], tuple[int, int, float]]) -> CollectorRegistry:
    """A registry of the engine's metrics alone (never the process-wide default: several engines share a process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(metrics, state))
    return registry
