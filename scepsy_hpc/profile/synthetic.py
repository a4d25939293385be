"""Synthetic profiles: the saturation sweep run in the simulator instead of on an engine.

The calls replayed are the LLM's own mix (prompt and output tokens as traced or sampled from the
workflow's program), so a synthetic profile differs from a measured one only by the engine
performance model. This is the embedded default: planning works with no engine at all.
"""

from __future__ import annotations

import datetime as _dt
import random
from dataclasses import replace
from typing import Sequence

from scepsy_hpc.perf.model import EngineConfig, EnginePerf
from scepsy_hpc.perf.replay import WARM, replay_calls
from scepsy_hpc.profile.sweep import FRACTIONS, sweep
from scepsy_hpc.profile.table import CallSample, ProfilePoint, ProfileTable, summarise
from scepsy_hpc.workload.arrivals import poisson_arrivals
from scepsy_hpc.workload.sampler import Call

WARMUP_FRAC = 0.1
STEADY_FRAC = 0.25


def capacity_guess(cfg: EngineConfig, mix: Sequence[tuple[int, ...]]) -> float:
    """A rough calls/s capacity from the model: a full batch prefilled in whole chunks, then decoded."""
    perf = EnginePerf(cfg)
    p = sum(m[0] for m in mix) / len(mix)
    new = sum(m[0] - (m[2] if len(m) > 2 else 0) for m in mix) / len(mix)   # the prefill a warm cache leaves
    o = sum(m[1] for m in mix) / len(mix)
    batch = max(1, min(cfg.max_num_seqs, int(perf.kv_capacity_tokens // max(p + o, 1))))
    budget = cfg.max_batched_tokens
    prefill_s = batch * new / budget * perf.iteration_time(0, 0.0, [(budget, 0)])
    decode_s = max(o - 1, 0) * perf.iteration_time(batch, batch * (p + o / 2))
    return batch / max(prefill_s + decode_s, 1e-9)


Pattern = Sequence[tuple[float, int, int]]  # one request's calls of an LLM: (offset s, prompt, output)


def mix_call(i: int, entry: Sequence[int]) -> Call:
    """Replayed call `i` of a mix entry (prompt, output[, cached]): its first `cached` tokens (the reuse the
    workflow offers, `predict.inputs.warm_cached_tokens`) are its own history, found cached on arrival as far
    as the engine's free KV space holds it (`perf.replay.replay_calls`); the rest is new."""
    prompt, output = entry[0], entry[1]
    cached = entry[2] if len(entry) > 2 else 0
    if not cached:
        return Call("m", None, prompt, output)
    return Call("m", None, prompt, output, (((WARM, i), cached), (("call", i), prompt - cached)), ("answer", i))


def _arrivals(rate_rps: float, n_calls: int, rng: random.Random, mix: Sequence[tuple[int, ...]],
              patterns: Sequence[Pattern] | None) -> tuple[list[float], list[Call]]:
    """Call arrival times and sizes: Poisson single calls, or Poisson requests each releasing its
    pattern's calls at their recorded offsets (bursts and spacing as in the workflow)."""
    if not patterns:
        return poisson_arrivals(rate_rps, n_calls, rng), [mix_call(i, mix[rng.randrange(len(mix))]) for i in range(n_calls)]
    per_request = sum(len(q) for q in patterns) / len(patterns)
    req_rate = rate_rps / per_request
    horizon = n_calls / rate_rps  # requests arrive until then; calls past it are cut, so the call
    timed: list[tuple[float, int, int]] = []  # rate stays λ·n up to the end (a pattern can be long)
    t = rng.expovariate(req_rate)
    while t < horizon:
        timed.extend((t + off, pr, out) for off, pr, out in patterns[rng.randrange(len(patterns))] if t + off < horizon)
        t += rng.expovariate(req_rate)
    timed.sort()
    return [x[0] for x in timed], [Call("m", None, x[1], x[2]) for x in timed]


def measure_sim(cfg: EngineConfig, mix: Sequence[tuple[int, int]], rate_rps: float, n_calls: int,
                seed: int, replicas: int = 1, patterns: Sequence[Pattern] | None = None
                ) -> tuple[list[CallSample], float, float]:
    """Replay `n_calls` calls at `rate_rps` in all (to `replicas` replicas behind one queue) in the
    simulator: the measured calls' samples, the loaded window (after warm-up, up to the last
    arrival) and the completed-call rate in it (calls/s, all replicas)."""
    rng = random.Random(f"{seed}/profile/{rate_rps:.6g}")
    arrivals, calls = _arrivals(rate_rps, n_calls, rng, mix, patterns)
    recs = replay_calls(cfg, calls, arrivals, replicas=replicas)
    skip = int(len(calls) * WARMUP_FRAC)
    measured = [r for r in recs if r.request >= skip]
    samples = [CallSample(r.prompt_tokens, r.output_tokens, r.t_end - r.t_submit, r.t_first - r.t_submit) for r in measured]
    # Throughput window: from the STEADY_FRAC-th completion (the batch has filled, even for a large
    # max_num_seqs at overload) to the last arrival (an overloaded engine is still backlogged then).
    ends = sorted(r.t_end for r in recs)
    w0 = max(arrivals[skip], ends[int(len(ends) * STEADY_FRAC)] if ends else 0.0)
    w1 = arrivals[-1]
    if w1 <= w0:  # so overloaded that few calls finished before the last arrival: the completion rate
        w1 = ends[-1]
        return samples, (w1 - w0), sum(1 for e in ends if w0 < e <= w1) / max(w1 - w0, 1e-12)
    done_in = sum(1 for e in ends if w0 < e <= w1)
    arrived_in = sum(1 for a in arrivals if w0 < a <= w1)
    # Completions per arrival in the window, times the offered rate: the arrival count's own noise
    # (large when whole requests arrive together) cancels out.
    return samples, (w1 - w0), rate_rps * done_in / max(arrived_in, 1)


def synthetic_profile(
    llm: str,
    model_name: str,
    gpu_name: str,
    cfg: EngineConfig,
    mix: Sequence[tuple[int, int]],
    *,
    n_calls: int = 2000,
    seed: int = 0,
    workflow: str = "",
    fractions: Sequence[float] = FRACTIONS,
    replicas: int = 1,
    patterns: Sequence[Pattern] | None = None,
) -> ProfileTable:
    """A ProfileTable for `replicas` replicas of `cfg` behind one gateway queue serving calls drawn
    from `mix` [(prompt, output), ...] as Poisson arrivals — or, given `patterns`, whole requests'
    calls at their recorded offsets. Rates and capacity are per replica."""
    if not mix:
        raise ValueError(f"no calls recorded for LLM {llm!r}: nothing to profile")

    def measure(rate: float) -> ProfilePoint:
        samples, window, thr = measure_sim(cfg, mix, rate * replicas, n_calls * replicas, seed, replicas, patterns)
        return replace(summarise(rate, samples, window), throughput_rps=thr / replicas)

    guess = capacity_guess(cfg, mix)
    res = sweep(measure, max(guess * 0.04, 1e-4), fractions=tuple(fractions))
    p_mean = sum(m[0] for m in mix) / len(mix)
    o_mean = sum(m[1] for m in mix) / len(mix)
    return ProfileTable(
        llm=llm, model=model_name, gpu=gpu_name, tp=cfg.tp,
        gpu_frac=cfg.gpu_frac, capacity_rps=res.capacity_rps, points=res.points, source="synthetic",
        engine="scepsy-sim", engine_version="perf-model", max_num_seqs=cfg.max_num_seqs,
        replicas=replicas, arrivals="requests" if patterns else "poisson",
        workload={"workflow": workflow, "calls": len(mix), "prompt_tokens_mean": round(p_mean, 1),
                  "output_tokens_mean": round(o_mean, 1), "calls_per_point": n_calls, "seed": seed},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
