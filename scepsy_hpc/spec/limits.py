"""Bounds on every input quantity that could otherwise cost unbounded time or memory, in one place.

Each limit has a default far above real use and is raised by an environment variable of the same
name (`SCEPSY_MAX_CALLS_PER_REQUEST=500000`); a refusal names the limit, its value and that variable.
The variables are read when a limit is checked (not at import), so a test or a user can set them.

| variable | default | bounds |
|---|---|---|
| SCEPSY_MAX_FILE_BYTES | 8 MiB | a YAML input file (workflow, plan, cluster, catalog) |
| SCEPSY_MAX_YAML_NODES | 500,000 | YAML nodes after alias expansion (an alias bomb) |
| SCEPSY_MAX_YAML_ALIASES | 10,000 | uses of `*anchor` in one file |
| SCEPSY_MAX_YAML_DEPTH | 100 | nesting of mappings and lists |
| SCEPSY_MAX_HOSTS | 100,000 | names one hostlist expression expands to |
| SCEPSY_MAX_FANOUT | 10,000 | a fan-out's `count` (largest value it can take) |
| SCEPSY_MAX_LOOP_REPEAT | 10,000 | a loop's `repeat` (largest value it can take) |
| SCEPSY_MAX_CALLS_PER_REQUEST | 100,000 | expected LLM calls and tool uses of one request, through `use` |
| SCEPSY_MAX_TOKENS | 10,000,000 | any token count (prompt or output); a model's context bounds it too |
| SCEPSY_MAX_SECONDS | 86,400 | a tool latency or other duration in a spec |
| SCEPSY_MAX_REPLICAS | 4,096 | replicas of one LLM in a plan |
| SCEPSY_MAX_GPUS | 4,096 | GPUs of a plan, a cluster node group total, or `--gpus` |
| SCEPSY_MAX_REQUESTS | 10,000,000 | requests, samples or calls asked for on the command line |
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from scepsy_hpc.errors import SpecError


@dataclass(frozen=True)
class Limit:
    """One bound: its environment variable, default and what it bounds (for the message)."""

    env: str
    default: int
    what: str

    def value(self) -> int:
        """The limit in force: the environment variable if set to a whole number ≥ 1, else the default."""
        text = os.environ.get(self.env)
        if text is None or not text.strip():
            return self.default
        try:
            n = int(text)
        except ValueError:
            raise SpecError(f"{self.env}={text!r}: give a whole number ≥ 1, or unset it (default {self.default:,})") from None
        if n < 1:
            raise SpecError(f"{self.env}={text!r}: give a whole number ≥ 1, or unset it (default {self.default:,})")
        return n

    def hint(self) -> str:
        """`the limit is N (SCEPSY_MAX_X raises it)`."""
        return f"the limit is {self.value():,} {self.what} ({self.env}=N raises it if you really need more)"

    def exceeded(self, n: float) -> bool:
        """Whether `n` is over the limit (NaN counts as over)."""
        return not n <= self.value()


FILE_BYTES = Limit("SCEPSY_MAX_FILE_BYTES", 8 * 1024 * 1024, "bytes per input file")
YAML_NODES = Limit("SCEPSY_MAX_YAML_NODES", 500_000, "YAML nodes after alias expansion")
YAML_ALIASES = Limit("SCEPSY_MAX_YAML_ALIASES", 10_000, "alias uses per file")
YAML_DEPTH = Limit("SCEPSY_MAX_YAML_DEPTH", 100, "levels of nesting")
HOSTS = Limit("SCEPSY_MAX_HOSTS", 100_000, "hosts per hostlist")
FANOUT = Limit("SCEPSY_MAX_FANOUT", 10_000, "copies per fan-out")
LOOP_REPEAT = Limit("SCEPSY_MAX_LOOP_REPEAT", 10_000, "repeats per loop")
CALLS_PER_REQUEST = Limit("SCEPSY_MAX_CALLS_PER_REQUEST", 100_000, "LLM calls and tool uses per request")
TOKENS = Limit("SCEPSY_MAX_TOKENS", 10_000_000, "tokens")
SECONDS = Limit("SCEPSY_MAX_SECONDS", 86_400, "seconds")
REPLICAS = Limit("SCEPSY_MAX_REPLICAS", 4_096, "replicas per LLM")
GPUS = Limit("SCEPSY_MAX_GPUS", 4_096, "GPUs")
REQUESTS = Limit("SCEPSY_MAX_REQUESTS", 10_000_000, "requests, samples or calls")

ALL = (FILE_BYTES, YAML_NODES, YAML_ALIASES, YAML_DEPTH, HOSTS, FANOUT, LOOP_REPEAT, CALLS_PER_REQUEST, TOKENS,
       SECONDS, REPLICAS, GPUS, REQUESTS)
