"""ProfileTable: one LLM configuration's per-call latency against offered load, and its capacity.

A profile is measured per replica: calls of the LLM's recorded mix arrive open-loop (Poisson) at
`rate_rps` calls/s. Each point keeps the mean latency and a per-call latency model fitted on the
point's calls, so a predictor can price a call of any size at that load:

    latency(prompt, output) ≈ ttft_a_s + ttft_b_s · prompt + tpot_s · (output − 1)

(least squares for the TTFT line; tpot_s = Σ(latency − ttft) / Σ(output − 1)), which averages to the
point's mean latency over its own calls. Files are JSON, one configuration each.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.records import write_atomic

SOURCES = ("measured", "synthetic")
ARRIVALS = ("poisson", "requests")


@dataclass(frozen=True)
class CallSample:
    """One finished call as a profiler observed it (seconds from its submission)."""

    prompt_tokens: int
    output_tokens: int
    latency_s: float
    ttft_s: float


@dataclass(frozen=True)
class ProfilePoint:
    """Measured behaviour at one offered rate (calls/s to one replica)."""

    rate_rps: float
    throughput_rps: float
    calls: int
    latency_mean_s: float
    latency_p50_s: float
    latency_p90_s: float
    latency_p99_s: float
    ttft_mean_s: float
    ttft_a_s: float
    ttft_b_s: float
    tpot_s: float
    errors: int = 0
    saturated: bool = False

    def call_latency(self, prompt_tokens: float, output_tokens: float) -> float:
        """Predicted latency of one call of this size at this load."""
        return self.ttft_a_s + self.ttft_b_s * prompt_tokens + self.tpot_s * max(output_tokens - 1.0, 0.0)


def _pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(rate_rps: float, samples: Sequence[CallSample], span_s: float, errors: int = 0,
              saturated: bool = False) -> ProfilePoint:
    """A ProfilePoint from the calls finished at one rate; `span_s` is the window they completed in."""
    n = len(samples)
    if n == 0:
        nan = math.nan
        return ProfilePoint(rate_rps, 0.0, 0, nan, nan, nan, nan, nan, nan, 0.0, nan, errors, True)
    lat = sorted(s.latency_s for s in samples)
    mp = sum(s.prompt_tokens for s in samples) / n
    mt = sum(s.ttft_s for s in samples) / n
    var = sum((s.prompt_tokens - mp) ** 2 for s in samples)
    b = sum((s.prompt_tokens - mp) * (s.ttft_s - mt) for s in samples) / var if var > 0 else 0.0
    b = max(b, 0.0)  # a negative slope is noise; a longer prompt never makes the first token sooner
    a = mt - b * mp
    dec = sum(max(s.output_tokens - 1, 0) for s in samples)
    tpot = sum(s.latency_s - s.ttft_s for s in samples) / dec if dec else 0.0
    return ProfilePoint(
        rate_rps=rate_rps, throughput_rps=n / span_s if span_s > 0 else 0.0, calls=n,
        latency_mean_s=sum(lat) / n, latency_p50_s=_pct(lat, 0.5), latency_p90_s=_pct(lat, 0.9),
        latency_p99_s=_pct(lat, 0.99), ttft_mean_s=mt, ttft_a_s=a, ttft_b_s=b, tpot_s=tpot,
        errors=errors, saturated=saturated)


@dataclass(frozen=True)
class ProfileTable:
    """Latency vs. offered load of one (LLM, model, GPU, tp, gpu_frac) configuration, per replica."""

    llm: str
    model: str
    gpu: str
    tp: int
    gpu_frac: float
    capacity_rps: float
    points: tuple[ProfilePoint, ...]
    source: str = "synthetic"
    engine: str = "scepsy-sim"
    engine_version: str = ""
    max_num_seqs: int = 256
    replicas: int = 1          # replicas measured together behind one queue (rates are per replica)
    arrivals: str = "poisson"  # "poisson": single calls; "requests": whole requests' call patterns
    workload: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    command: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.arrivals not in ARRIVALS:
            raise ValueError(f"arrivals must be one of {ARRIVALS}, got {self.arrivals!r}")
        pts = sorted((p for p in self.points if not p.saturated and p.calls > 0), key=lambda p: p.rate_rps)
        object.__setattr__(self, "_fit", tuple(pts))
        object.__setattr__(self, "_rates", [p.rate_rps for p in pts])

    @property
    def key(self) -> tuple[str, int, float]:
        """(llm, tp, gpu_frac): how a store finds this profile."""
        return (self.llm, self.tp, round(self.gpu_frac, 4))

    @property
    def unloaded(self) -> ProfilePoint:
        """The lowest-load point."""
        return self._fit[0]  # type: ignore[attr-defined]

    def point_at(self, rate_rps: float) -> ProfilePoint | None:
        """The per-call model at `rate_rps` per replica, interpolated; None at or past capacity.

        Between measured rates the fields interpolate linearly. Past the highest unsaturated point
        the load-dependent part grows like a single-server queue, by (1 − x₁/μ)/(1 − x/μ)."""
        pts: tuple[ProfilePoint, ...] = self._fit  # type: ignore[attr-defined]
        if not pts:
            return None
        mu = self.capacity_rps
        if rate_rps >= mu:
            return None
        rates: list[float] = self._rates  # type: ignore[attr-defined]
        if rate_rps <= rates[0]:
            return pts[0]
        i = bisect.bisect_right(rates, rate_rps)
        if i < len(pts):
            p, q = pts[i - 1], pts[i]
            w = (rate_rps - p.rate_rps) / (q.rate_rps - p.rate_rps)
            return _lerp(p, q, w, rate_rps)
        last, first = pts[-1], pts[0]
        k = (1.0 - last.rate_rps / mu) / (1.0 - rate_rps / mu) if last.rate_rps < mu else 1.0
        return _grow(first, last, k, rate_rps)

    def latency_at(self, rate_rps: float) -> float:
        """Mean per-call latency at `rate_rps` calls/s per replica (inf at or past capacity)."""
        p = self.point_at(rate_rps)
        return math.inf if p is None else p.latency_mean_s

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        d["points"] = [asdict(p) for p in self.points]
        return {"kind": "profile", "version": 1, **d}


def _lerp(p: ProfilePoint, q: ProfilePoint, w: float, rate: float) -> ProfilePoint:
    def f(a: float, b: float) -> float:
        return a + (b - a) * w
    return ProfilePoint(rate, f(p.throughput_rps, q.throughput_rps), 0, f(p.latency_mean_s, q.latency_mean_s),
                        f(p.latency_p50_s, q.latency_p50_s), f(p.latency_p90_s, q.latency_p90_s),
                        f(p.latency_p99_s, q.latency_p99_s), f(p.ttft_mean_s, q.ttft_mean_s),
                        f(p.ttft_a_s, q.ttft_a_s), f(p.ttft_b_s, q.ttft_b_s), f(p.tpot_s, q.tpot_s))


def _grow(base: ProfilePoint, last: ProfilePoint, k: float, rate: float) -> ProfilePoint:
    def g(b: float, x: float) -> float:
        return b + (x - b) * k if x > b else x * k
    # The TTFT intercept carries queueing; the slope and per-token time grow with the batch.
    return ProfilePoint(rate, rate, 0, g(base.latency_mean_s, last.latency_mean_s),
                        g(base.latency_p50_s, last.latency_p50_s), g(base.latency_p90_s, last.latency_p90_s),
                        g(base.latency_p99_s, last.latency_p99_s), g(base.ttft_mean_s, last.ttft_mean_s),
                        g(base.ttft_a_s, last.ttft_a_s), last.ttft_b_s, g(base.tpot_s, last.tpot_s))


_POINT_FIELDS = set(ProfilePoint.__dataclass_fields__)
_TABLE_FIELDS = set(ProfileTable.__dataclass_fields__)


def table_from_dict(d: dict[str, Any], where: str) -> ProfileTable:
    """A ProfileTable from its JSON form; problems name `where`."""
    if not isinstance(d, dict) or d.get("kind") != "profile":
        raise SpecError(f"{where}: not a profile file (expected a JSON object with \"kind\": \"profile\")")
    body = {k: v for k, v in d.items() if k not in ("kind", "version")}
    unknown = sorted(set(body) - _TABLE_FIELDS)
    missing = sorted(k for k in ("llm", "model", "gpu", "tp", "gpu_frac", "capacity_rps", "points") if k not in body)
    if unknown or missing:
        raise SpecError(f"{where}: profile has unknown field(s) {unknown} / lacks {missing}")
    pts = []
    for i, p in enumerate(body["points"]):
        bad = sorted(set(p) - _POINT_FIELDS) if isinstance(p, dict) else ["<not an object>"]
        if bad:
            raise SpecError(f"{where}: points[{i}] has unknown field(s) {', '.join(bad)}")
        try:
            pts.append(ProfilePoint(**p))
        except TypeError as e:
            raise SpecError(f"{where}: points[{i}]: {e}") from None
    body["points"] = tuple(pts)
    try:
        return ProfileTable(**body)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{where}: {e}") from None


def profile_filename(t: ProfileTable) -> str:
    """File name of a profile inside a profile directory."""
    return f"{t.llm}.{t.model}.{t.gpu}.tp{t.tp}.f{t.gpu_frac:g}.json"


def save_profile(t: ProfileTable, directory: str | Path) -> Path:
    """Write `t` into `directory` (created if needed); returns the path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    p = d / profile_filename(t)
    write_atomic(p, json.dumps(t.to_dict(), indent=1, allow_nan=True) + "\n")  # never a half-written profile
    return p


def load_profile(path: str | Path) -> ProfileTable:
    """Read one profile file."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except OSError as e:
        raise SpecError(f"{p}: cannot read profile: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{p}:{e.lineno}: not JSON: {e.msg}") from None
    return table_from_dict(d, str(p))


def load_profiles(directory: str | Path) -> list[ProfileTable]:
    """Every profile file in `directory`."""
    d = Path(directory)
    if not d.is_dir():
        raise SpecError(f"{d}: no such profile directory; run `scepsy profile` to make one")
    return [load_profile(p) for p in sorted(d.glob("*.json"))]


def samples_from(prompts: Iterable[int], outputs: Iterable[int], latencies: Iterable[float],
                 ttfts: Iterable[float]) -> list[CallSample]:
    """CallSamples from parallel sequences."""
    return [CallSample(p, o, l, t) for p, o, l, t in zip(prompts, outputs, latencies, ttfts)]
