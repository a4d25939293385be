"""Prometheus metrics of the simulated engine, under vLLM's names, written as exposition text.

Values are model seconds (the engine's virtual clock), so a gateway reading them sees what a real
engine would report whatever the time scale. Bucket boundaries are vLLM V1's.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

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

    def lines(self, name: str, labels: str) -> list[str]:
        """Exposition lines: cumulative buckets, +Inf, _sum and _count."""
        out, cum = [], 0
        for b, c in zip(self.bounds, self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{b}",{labels}}} {cum}')
        out.append(f'{name}_bucket{{le="+Inf",{labels}}} {self.n}')
        out.append(f"{name}_sum{{{labels}}} {self.total!r}")
        out.append(f"{name}_count{{{labels}}} {self.n}")
        return out


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

    def render(self, running: int, waiting: int, kv_usage: float) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        name = self.model_name.replace("\\", "\\\\").replace('"', '\\"')
        lab = f'model_name="{name}"'
        out: list[str] = []

        def head(metric: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {metric} {help_}")
            out.append(f"# TYPE {metric} {kind}")

        head("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.")
        out.append(f"vllm:num_requests_running{{{lab}}} {running}")
        head("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.")
        out.append(f"vllm:num_requests_waiting{{{lab}}} {waiting}")
        head("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.")
        out.append(f"vllm:kv_cache_usage_perc{{{lab}}} {kv_usage!r}")
        head("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.")
        out.append(f"vllm:prompt_tokens_total{{{lab}}} {self.prompt_tokens}")
        head("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.")
        out.append(f"vllm:generation_tokens_total{{{lab}}} {self.generation_tokens}")
        head("vllm:request_success_total", "counter", "Count of successfully processed requests.")
        for reason, count in self.success.items():
            out.append(f'vllm:request_success_total{{finished_reason="{reason}",{lab}}} {count}')
        for metric, hist, help_ in (
            ("vllm:time_to_first_token_seconds", self.ttft, "Histogram of time to first token in seconds."),
            ("vllm:time_per_output_token_seconds", self.tpot, "Histogram of time per output token in seconds."),
            ("vllm:e2e_request_latency_seconds", self.e2e, "Histogram of e2e request latency in seconds."),
        ):
            head(metric, "histogram", help_)
            out.extend(hist.lines(metric, lab))
        head("scepsy_sim_delivery_lag_seconds_total", "counter",
             "Wall seconds by which iterations were delivered later than the time scale asks, summed.")
        out.append(f"scepsy_sim_delivery_lag_seconds_total{{{lab}}} {self.lag_s!r}")
        head("scepsy_sim_iterations_delivered_total", "counter", "Iterations whose tokens were delivered.")
        out.append(f"scepsy_sim_iterations_delivered_total{{{lab}}} {self.deliveries}")
        return "\n".join(out) + "\n"
