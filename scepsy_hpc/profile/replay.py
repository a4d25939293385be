"""Open-loop replay of an LLM's recorded calls against a live OpenAI-compatible endpoint.

Calls arrive as a Poisson process at the offered rate, whatever the engine does (open loop): each
is a streamed `/v1/completions` request whose prompt is a list of `prompt_tokens` token ids and
which asks for exactly `output_tokens` tokens (`max_tokens` with `ignore_eos`, as vLLM accepts), so
the engine sees the recorded sizes. Prefix caches (on by default in vLLM and SGLang) see what the
workflow offers and no more: a call's first `cached` tokens (a mix entry's third number, the reuse
of a warm cache: `predict.inputs.warm_cached_tokens`) are one warm prefix every call shares, the rest
are token ids of its own, so no call hits another's prompt by accident. Times are converted to model seconds by `time_scale` (engines
that pace s× real time); rates are in model time too.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import replace
from typing import Sequence

from scepsy_hpc.errors import EngineError
from scepsy_hpc.profile.table import CallSample, ProfilePoint, summarise

WARMUP_FRAC = 0.1
STEADY_FRAC = 0.25
MIN_WINDOW_CALLS = 40
DRIFT = 1.3  # last third of the calls this much slower than the first: the queue grows
TOKEN_ID = 1000  # any id inside every vocabulary: the warm prefix
OWN_IDS = (1001, 30000)   # a call's own token ids are drawn from these (inside every vocabulary too)


def prompt_ids(prompt: int, cached: int, rng: random.Random) -> list[int]:
    """A replayed prompt: `cached` tokens of the shared warm prefix, then its own ids (a run from a random
    start: two calls share a first own id, and so more than the warm prefix, once in ~29,000)."""
    lo, span = OWN_IDS[0], OWN_IDS[1] - OWN_IDS[0]
    start = rng.randrange(span)
    return [TOKEN_ID] * cached + [lo + (start + k) % span for k in range(prompt - cached)]


async def _one(session, url: str, model: str, prompt: list[int], output: int, t0: float, scale: float,
               out: list, errors: list) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": output, "ignore_eos": True,
            "stream": True, "temperature": 0.0}
    t_submit = time.perf_counter()
    t_first = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                errors.append(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                if t_first is None:
                    chunk = json.loads(data)
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        t_first = time.perf_counter()
    except Exception as e:  # the engine's failure, not ours: count it and go on
        errors.append(f"{type(e).__name__}: {e}")
        return
    t_end = time.perf_counter()
    t_first = t_first or t_end
    out.append((t_submit, (t_end - t_submit) / scale, (t_first - t_submit) / scale, len(prompt), output, (t_end - t0) / scale))


async def replay(base_url: str, model: str, mix: Sequence[tuple[int, ...]], rate_rps: float, n_calls: int, *,
                 time_scale: float = 1.0, seed: int = 0, timeout_s: float = 600.0) -> tuple[list[CallSample], float, int, int]:
    """Replay `n_calls` calls drawn from `mix` at `rate_rps` (model time): (samples, window, completed
    calls/s in the window — the offered rate times completions per arrival there —, errors)."""
    import aiohttp

    rng = random.Random(f"{seed}/replay/{rate_rps:.6g}")
    gaps = [rng.expovariate(rate_rps) for _ in range(n_calls)]
    calls = [mix[rng.randrange(len(mix))] for _ in range(n_calls)]
    url = base_url.rstrip("/") + "/v1/completions"
    out: list = []
    errors: list[str] = []
    arrivals: list[float] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        t0 = time.perf_counter()
        t_next = 0.0
        tasks = []
        for gap, m in zip(gaps, calls):
            p = prompt_ids(m[0], m[2] if len(m) > 2 else 0, rng)
            o = m[1]
            t_next += gap
            delay = t0 + t_next * time_scale - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            arrivals.append((time.perf_counter() - t0) / time_scale)
            tasks.append(asyncio.create_task(_one(session, url, model, p, o, t0, time_scale, out, errors)))
        await asyncio.gather(*tasks)
    if not out:
        raise EngineError(f"{base_url}: every replayed call failed; first error: {errors[0] if errors else 'none'}")
    out.sort()
    skip = int(n_calls * WARMUP_FRAC)
    measured = out[skip:]
    samples = [CallSample(p, o, lat, ttft) for _, lat, ttft, p, o, _ in measured]
    ends = sorted(e for *_, e in out)
    k1 = int(len(ends) * STEADY_FRAC)
    k2 = max(k1 + 1, int(len(ends) * 0.7))  # before the final drain, when batches shrink and calls finish fast
    # An engine that cannot keep up stays backlogged from the STEADY_FRAC-th completion until the
    # queue has nearly drained: its completion rate there is its service rate, whatever the offer.
    span = ends[k2] - ends[k1]
    backlog_rps = (k2 - k1) / span if span > 0 else 0.0
    w0 = max(arrivals[min(skip, len(arrivals) - 1)], ends[k1])
    w1 = arrivals[-1]
    arrived_in = sum(1 for a in arrivals if w0 < a <= w1)
    if arrived_in < MIN_WINDOW_CALLS:  # latency long next to the run: only the backlog rate is left
        return samples, max(span, 1e-9), backlog_rps, len(errors)
    done_in = sum(1 for e in ends if w0 < e <= w1)
    kept_up = rate_rps * done_in / arrived_in
    # Short runs read an overloaded engine's window poorly; past the offer, trust the backlog rate.
    return samples, w1 - w0, kept_up if kept_up >= 0.9 * rate_rps and not _drifts(samples) else min(backlog_rps, kept_up * 1.5), len(errors)


def _drifts(samples: Sequence[CallSample]) -> bool:
    """Latency climbs through the run (samples in submission order): the queue grows."""
    k = len(samples) // 3
    if k < 10:
        return False
    return sum(x.latency_s for x in samples[-k:]) > DRIFT * sum(x.latency_s for x in samples[:k])


class EngineLagError(EngineError):
    """A simulated engine could not keep its time scale: its measurements are not to be trusted."""


def lag_counters(base_url: str) -> tuple[float, float] | None:
    """(lag seconds, iterations) from a simulated engine's /metrics; None for other engines."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    wanted = ("scepsy_sim_delivery_lag_seconds_total", "scepsy_sim_iterations_delivered_total")
    try:
        vals = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name in wanted}
    except ValueError:  # not Prometheus text: not an engine we can check
        return None
    if len(vals) < 2:
        return None
    return vals["scepsy_sim_delivery_lag_seconds_total"], vals["scepsy_sim_iterations_delivered_total"]


def measure_http(base_url: str, model: str, mix: Sequence[tuple[int, int]], n_calls: int, *,
                 time_scale: float = 1.0, seed: int = 0, max_lag: float = 0.05):
    """A `measure(rate) -> ProfilePoint` for the sweep, replaying against `base_url`.

    Against a simulated engine, also checks that it kept its time scale: tokens that go out late
    make every call look longer by that much, so if its iterations went out late by more than
    `max_lag` of the point's mean latency on average, the point is not what the model says and
    EngineLagError is raised (run it slower: a larger time scale)."""
    def measure(rate: float) -> ProfilePoint:
        before = lag_counters(base_url)
        samples, window, thr, errors = asyncio.run(
            replay(base_url, model, mix, rate, n_calls, time_scale=time_scale, seed=seed))
        point = replace(summarise(rate, samples, window, errors=errors), throughput_rps=thr)
        if _drifts(samples):
            point = replace(point, saturated=True)
        after = lag_counters(base_url) if before is not None else None
        if before is not None and after is not None and after[1] > before[1] and point.latency_mean_s > 0:
            lag_model_s = (after[0] - before[0]) / (after[1] - before[1]) / time_scale
            if lag_model_s > max_lag * point.latency_mean_s:
                raise EngineLagError(f"{base_url}: the simulated engine fell behind its time scale {time_scale:g} at "
                                     f"{rate:.3g} calls/s (iterations {lag_model_s * 1e3:.1f} ms late on average, "
                                     f"calls take {point.latency_mean_s * 1e3:.0f} ms)")
        return point
    return measure
