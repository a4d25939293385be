"""Prometheus metrics of the simulated engine, under vLLM's names, exposed through prometheus_client;
and the reading of any engine's /metrics as its load (`scrape_load`), which the node agent's progress
watchdog compares from one look to the next.

Values are model seconds (the engine's virtual clock), so a gateway reading them sees what a real
engine would report whatever the time scale. Bucket boundaries are vLLM V1's. A collector yields
metric families from the live state at scrape time, which keeps the exposed names exactly vLLM's
(prometheus_client's own Counter would add `_created` series) and costs nothing between scrapes.

The load is read under vLLM's names (`vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:prompt_tokens_total`, `vllm:generation_tokens_total`; the sim engine's too) or SGLang's
(`sglang:num_queue_reqs`, `sglang:num_running_reqs`, `sglang:prompt_tokens_total`,
`sglang:generation_tokens_total`, served only with `--enable-metrics`), each summed over its label sets
(vLLM V1 labels each engine core).
"""

from __future__ import annotations

import bisect
import http.client
import itertools
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

# What `generate_latest` writes (the 0.0.4 text format) in every release we support; the library's
# CONTENT_TYPE_LATEST names 1.0.0 from 0.22 on, and this constant's own name only exists since then.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                  40.0, 80.0)
SCRAPE_MAX_BYTES = 16 * 2**20   # a /metrics page larger than this is not an engine's
# sample name → the EngineLoad field it adds to: vLLM's names (the sim engine's too), then SGLang's
LOAD_SAMPLES = {
    "vllm:num_requests_waiting": "waiting", "vllm:num_requests_running": "running",
    "vllm:prompt_tokens_total": "tokens", "vllm:generation_tokens_total": "tokens",
    "sglang:num_queue_reqs": "waiting", "sglang:num_running_reqs": "running",
    "sglang:prompt_tokens_total": "tokens", "sglang:generation_tokens_total": "tokens",
}
# Engines are on our network: never route a scrape through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
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
        self.prefix_queries = 0   # prompt tokens looked up in the prefix cache (vLLM counts them at scheduling)
        self.prefix_hits = 0      # of those, tokens found cached
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
            counter("vllm:prefix_cache_queries_total",
                    "Prefix cache queries, in terms of number of queried tokens.", self.prefix_queries),
            counter("vllm:prefix_cache_hits_total",
                    "Prefix cache hits, in terms of number of cached tokens.", self.prefix_hits),
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


@dataclass(frozen=True)
class EngineLoad:
    """What an engine's /metrics says of its work now."""

    waiting: int    # requests queued, not yet scheduled
    running: int    # requests in the running batch
    tokens: float   # prompt and generated tokens processed since the engine started (both counters summed)

    @property
    def busy(self) -> bool:
        """Whether the engine has requests to work on."""
        return self.waiting + self.running > 0


def parse_load(text: str) -> EngineLoad | None:
    """The load in Prometheus text; None when it holds no token counter or no request gauge (not an engine's
    metrics, or SGLang without --enable-metrics) or cannot be parsed."""
    sums = {"waiting": 0.0, "running": 0.0, "tokens": 0.0}
    seen: set[str] = set()
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = LOAD_SAMPLES.get(sample.name)
                if key is not None:
                    sums[key] += sample.value
                    seen.add(key)
    except (ValueError, TypeError, IndexError):   # what the parser raises on text that is not Prometheus'
        return None
    if "tokens" not in seen or not seen & {"waiting", "running"}:
        return None
    return EngineLoad(waiting=round(sums["waiting"]), running=round(sums["running"]), tokens=sums["tokens"])


def scrape_load(url: str, timeout_s: float = 2.0) -> EngineLoad | None:
    """GET `url`/metrics and parse the load; None when it cannot be read within `timeout_s` in all (a slow or
    dead engine) or holds no load. Never raises for what the engine answers."""
    deadline = time.monotonic() + timeout_s
    try:
        with _OPENER.open(f"{url}/metrics", timeout=timeout_s) as resp:
            if resp.status != 200:
                return None
            chunks: list[bytes] = []
            size = 0
            while chunk := resp.read1(65536):   # the deadline holds against an engine that dribbles bytes
                chunks.append(chunk)
                size += len(chunk)
                if size > SCRAPE_MAX_BYTES or time.monotonic() > deadline:
                    return None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return None
    return parse_load(b"".join(chunks).decode("utf-8", errors="replace"))
