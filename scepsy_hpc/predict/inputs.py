"""What a predictor needs, from a trace or from the workflow's program, and profiles per LLM.

Without a trace, requests are sampled from the program (`n_requests`, seeded) and each call lasts
what the profile's lowest-load point gives for its size — the workflow run unloaded. Without
measured profiles, synthetic ones are made from the engine performance model by replaying each
LLM's own call mix (profile.synthetic); they are cached by (model, GPU, tp, fraction, mix).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

from scepsy_hpc.errors import SpecError
from scepsy_hpc.profile.synthetic import synthetic_profile
from scepsy_hpc.profile.table import ProfileTable, load_profiles
from scepsy_hpc.workload.sampler import RequestSampler, iter_calls
from scepsy_hpc.spec.catalog import GPUSpec, ModelSpec
from scepsy_hpc.spec.plan import Entry, LLMAlloc, groups_of
from scepsy_hpc.spec.workflow import Workflow, resolve_model
from scepsy_hpc.perf.fit import engine_config, group_weights
from scepsy_hpc.perf.model import EnginePerf
from scepsy_hpc.perf.prefix import BLOCK_TOKENS, max_hit_tokens
from scepsy_hpc.predict import profile_cache
from scepsy_hpc.predict.pool import pool_profile
from scepsy_hpc.trace.graph import CALL, Node, RequestGraph, from_sample
from scepsy_hpc.trace.stats import call_patterns


def sample_program(wf: Workflow, n_requests: int = 1000, seed: int = 0) -> list[list[Any]]:
    """`n_requests` requests sampled from the workflow's program."""
    rng = random.Random(f"{seed}/predict-sample")
    sampler = RequestSampler(wf)
    return [sampler.sample(rng) for _ in range(n_requests)]


def warm_cached_tokens(seq: list[Any]) -> list[int]:
    """Per call of a sampled request (`iter_calls` order), the prompt tokens a warm prefix cache reuses: the
    leading whole blocks that an earlier call of the request to the same LLM computed (its prompt and answer),
    or a prompt prefix every request shares (`shared_prefix_tokens`: cached by the requests before), at most
    prompt − 1 (vLLM's rule). Eviction and the replica a call lands on are the simulator's business; this is
    the reuse the workflow offers. O(segments) per call: a segment's name stands for its content at its
    positions, so "computed up to position e" per name is all there is to remember."""
    seen: dict[str, dict[Any, int]] = {}
    out: list[int] = []
    for c in iter_calls(seq):
        if not c.segments:
            out.append(0)
            continue
        have = seen.setdefault(c.llm, {})
        pos = covered = 0
        for name, n in c.segments:
            end = pos + n
            reach = end if isinstance(name, tuple) and name[:1] == ("shared",) else min(end, have.get(name, pos))
            covered = reach
            if reach < end:
                break
            pos = end
        out.append(min(covered // BLOCK_TOKENS * BLOCK_TOKENS, max_hit_tokens(c.prompt_tokens)))
        pos = 0
        for name, n in c.segments + ((c.output_segment, c.output_tokens),):
            pos += n
            if have.get(name, -1) < pos:
                have[name] = pos
    return out


def sample_mix(seqs: Sequence[list[Any]]) -> dict[str, list[tuple[int, ...]]]:
    """Per LLM, the (prompt, output) tokens of every sampled call, and (prompt, output, cached) for a call
    that a warm prefix cache serves in part (`warm_cached_tokens`)."""
    mix: dict[str, list[tuple[int, ...]]] = {}
    for seq in seqs:
        for c, cached in zip(iter_calls(seq), warm_cached_tokens(seq)):
            mix.setdefault(c.llm, []).append((c.prompt_tokens, c.output_tokens, cached) if cached
                                             else (c.prompt_tokens, c.output_tokens))
    return mix


def program_graphs(seqs: Sequence[list[Any]], profiles: Mapping[str, ProfileTable]) -> list[RequestGraph]:
    """Graphs of sampled requests, each call lasting its unloaded time under `profiles`."""
    unloaded = {m: p.unloaded for m, p in profiles.items()}
    return [from_sample(f"s-{i:06d}", seq, lambda c: unloaded[c.llm].call_latency(c.prompt_tokens, c.output_tokens))
            for i, seq in enumerate(seqs)]


def regraph(graphs: Sequence[RequestGraph], profiles: Mapping[str, ProfileTable]) -> list[RequestGraph]:
    """The same graphs with every call's duration set to its unloaded time under `profiles`."""
    unloaded = {m: p.unloaded for m, p in profiles.items()}

    def node(n: Node) -> Node:
        if n.kind != CALL:
            return n
        d = unloaded[n.name].call_latency(n.prompt_tokens, n.output_tokens)
        return Node(n.kind, n.name, n.role, n.prompt_tokens, n.output_tokens, d, n.deps, n.gap_s, n.cached_tokens)

    return [RequestGraph(g.request, tuple(node(n) for n in g.nodes), g.tail_s, g.ok, None) for g in graphs]


PREFETCH_MIN = 16   # profiles to make at least before `ProfileSource.prefetch` starts processes


def _disk_key(args: tuple[Any, ...]) -> str | None:
    """The profile cache's key of a synthesis (predict.profile_cache); None for request-shaped ones."""
    llm, model_name, gpu_name, alloc, model, gpu, mix, n_calls, seed, workflow, reps, patterns = args
    if patterns:
        return None
    return profile_cache.key_of((llm, model_name, gpu_name, alloc, model, gpu, list(mix), n_calls, seed, workflow, reps))


def _cached(args: tuple[Any, ...]) -> ProfileTable | None:
    key = _disk_key(args)
    return profile_cache.load(key) if key is not None else None


def _synthesise(args: tuple[Any, ...]) -> ProfileTable:
    """One synthetic profile (a module function, so that a process pool can run it): from the per-user
    disk cache when it holds it, else simulated and kept there."""
    key = _disk_key(args)
    if key is not None:
        hit = profile_cache.load(key)
        if hit is not None:
            return hit
    llm, model_name, gpu_name, alloc, model, gpu, mix, n_calls, seed, workflow, reps, patterns = args
    cfg = engine_config(alloc, model, gpu)
    t = synthetic_profile(llm, model_name, gpu_name, cfg, mix, n_calls=n_calls, seed=seed, workflow=workflow,
                          replicas=reps, patterns=patterns)
    if key is not None:
        profile_cache.store(key, t)
    return t


def _try_synthesise(args: tuple[Any, ...]) -> ProfileTable | None:
    try:
        return _synthesise(args)
    except Exception:  # noqa: BLE001 — made again where it is asked for, which reports the error
        return None


def prefetch(wanted: Sequence[tuple["ProfileSource", str, LLMAlloc]], gpu_name: str, jobs: int = 0) -> int:
    """Synthesise the Poisson profiles of `wanted` (source, LLM, allocation) that their sources
    have not cached yet in `jobs` processes (0: the CPUs), so that `ProfileSource.get` finds them:
    the same profiles as made one by one (each is seeded by its rate and configuration alone),
    made side by side. Nothing happens for fewer than `PREFETCH_MIN` profiles or with one CPU.
    Returns the profiles made."""
    todo: dict[tuple[int, tuple[Any, ...]], tuple["ProfileSource", tuple[Any, ...]]] = {}
    for src, llm, alloc in wanted:
        got = src.missing(llm, alloc, gpu_name)
        if got is not None:
            hit = _cached(got[1])   # on disk already: no process needed
            if hit is not None:
                src._cache[got[0]] = hit
                continue
            todo.setdefault((id(src), got[0]), (src, got[1]))
    n = min(len(todo), jobs or os.cpu_count() or 1)
    if len(todo) < PREFETCH_MIN or n <= 1:
        return 0
    from concurrent.futures import ProcessPoolExecutor

    keys = sorted(todo, key=lambda k: -k[1][2])  # the largest tp (the slowest) first: the pool ends on short jobs
    made = 0
    with ProcessPoolExecutor(max_workers=n) as ex:
        for k, t in zip(keys, ex.map(_try_synthesise, [todo[k][1] for k in keys], chunksize=1)):
            if t is not None:
                todo[k][0]._cache[k[1]] = t
                made += 1
    return made


class ProfileSource:
    """Finds a profile per (LLM, tp, gpu_frac): from a directory of measured ones, else synthesised.

    A synthesised profile is what a measured one is: Poisson single calls of the LLM's mix on one
    replica; the predictor corrects it for pooling across replicas and for fan-out bursts.
    `shaped=True` instead synthesises for exactly the allocated replicas behind one queue, fed
    whole requests' calls at their offsets in the workflow (traced, or the sampled program run
    unloaded). Measured against the simulator (scripts/bench_predict.py --arrivals requests) that
    predicts latency as well and capacity worse (noisier: fewer independent arrivals per run), so
    it is not the default."""

    def __init__(self, wf: Workflow, models: Mapping[str, ModelSpec], gpus: Mapping[str, GPUSpec],
                 mix: Mapping[str, Sequence[tuple[int, int]]], profiles_dir: str | Path | None = None,
                 seed: int = 0, n_calls: int = 2000, *, seqs: Sequence[list[Any]] | None = None,
                 graphs: Sequence[RequestGraph] | None = None, shaped: bool = False) -> None:
        self.wf, self.models, self.gpus, self.mix = wf, models, gpus, mix
        self.shaped = shaped
        self.seed, self.n_calls = seed, n_calls
        self.seqs, self.graphs = seqs, graphs
        self.measured: dict[tuple[str, int, float], ProfileTable] = {}
        self.profiles_dir = Path(profiles_dir) if profiles_dir is not None else None
        if self.profiles_dir is not None:
            for t in load_profiles(self.profiles_dir):
                self.measured[t.key] = t
        self._cache: dict[tuple[Any, ...], ProfileTable] = {}
        self._hashes: dict[str, tuple[Any, str]] = {}

    def get(self, llm: str, alloc: LLMAlloc, gpu_name: str, patterns: Sequence[Any] | None = None,
            patterns_key: Any = None) -> ProfileTable:
        """The profile of `llm` under `alloc` on `gpu_name` GPUs (request-shaped when `patterns` are given)."""
        key = (llm, alloc.tp, round(alloc.gpu_frac, 4))
        if self.profiles_dir is not None:
            t = self.measured.get(key)
            if t is None:
                have = sorted(f"tp{k[1]}/f{k[2]:g}" for k in self.measured if k[0] == llm)
                raise SpecError(f"{self.profiles_dir}: no profile of LLM {llm!r} at tp={alloc.tp}, gpu_frac={alloc.gpu_frac:g}; "
                                f"it has: {', '.join(have) or 'none'}. Profile that configuration or drop --profiles")
            if t.gpu != gpu_name:
                raise SpecError(f"{self.profiles_dir}: the profile of {llm!r} was measured on {t.gpu}, the plan uses {gpu_name}")
            return t
        ck, args = self._job(llm, alloc, gpu_name, patterns, patterns_key)
        t = self._cache.get(ck)
        if t is None:
            t = self._cache[ck] = _synthesise(args)
        return t

    def _job(self, llm: str, alloc: LLMAlloc, gpu_name: str, patterns: Sequence[Any] | None = None,
             patterns_key: Any = None) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """(cache key, the arguments of `_synthesise`) of a synthetic profile."""
        model = resolve_model(self.wf, llm, self.models)
        mix = self.mix.get(llm)
        if not mix:
            raise SpecError(f"LLM {llm!r} has no calls in the trace or program sample: nothing to profile")
        h = self._hashes.get(llm)
        if h is None or h[0] is not mix:  # the mix's digest, once per mix (it was a sort + sha1 per call)
            h = self._hashes[llm] = (mix, hashlib.sha1(repr(sorted(mix)).encode()).hexdigest()[:12])
        reps = alloc.replicas if patterns else 1
        ck = (model.hf_id, gpu_name, alloc.tp, round(alloc.gpu_frac, 4), alloc.max_num_seqs, alloc.max_batched_tokens, h[1],
              reps, patterns_key)
        model_name = self.wf.llms[llm].model if isinstance(self.wf.llms[llm].model, str) else llm
        args = (llm, model_name, gpu_name, alloc, model, self.gpus[gpu_name], mix, self.n_calls, self.seed, self.wf.name,
                reps, patterns)
        return ck, args

    def missing(self, llm: str, alloc: LLMAlloc, gpu_name: str) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
        """(cache key, `_synthesise` arguments) of `llm`'s Poisson profile under `alloc` when it is to
        be synthesised and is not cached; None otherwise (measured profiles, or made already)."""
        if self.profiles_dir is not None or not self.mix.get(llm):
            return None
        ck, args = self._job(llm, alloc, gpu_name)
        return None if ck in self._cache else (ck, args)

    def patterns(self, allocation: Mapping[str, Entry], gpu_name: str) -> dict[str, list[Any]]:
        """Per LLM, each request's calls at their offsets: traced times, or the program run unloaded."""
        if self.graphs is not None:
            return call_patterns(self.graphs)
        if self.seqs is None:
            return {}
        # a mixed group's calls are timed on its first configuration: patterns only place calls in time
        perf = {m: EnginePerf(engine_config(groups_of(allocation[m])[0], resolve_model(self.wf, m, self.models),
                                            self.gpus[gpu_name]))
                for m in self.wf.llms if m in allocation}
        graphs = [from_sample(f"s-{i:06d}", seq, lambda c: perf[c.llm].request_latency(c.prompt_tokens, c.output_tokens))
                  for i, seq in enumerate(self.seqs)]
        return call_patterns(graphs)

    def for_allocation(self, allocation: Mapping[str, Entry], gpu_name: str) -> dict[str, ProfileTable]:
        """A profile per LLM of the workflow that the allocation serves; a mixed group's is the equivalent
        replica of its pool (`predict.pool`), to be used with all its replicas."""
        pats = self.patterns(allocation, gpu_name) if self.profiles_dir is None and self.shaped else {}
        key = (tuple(sorted((m, g.tp, g.gpu_frac, g.replicas) for m, e in allocation.items() for g in groups_of(e))),
               gpu_name) if pats else None
        out = {}
        for m in self.wf.llms:
            if m not in allocation or m not in self.mix:
                continue
            gs = groups_of(allocation[m])
            if len(gs) == 1:
                out[m] = self.get(m, gs[0], gpu_name, pats.get(m), key)
            else:
                weights = group_weights(allocation[m], resolve_model(self.wf, m, self.models), self.gpus[gpu_name])
                out[m] = pool_profile([(self.get(m, g, gpu_name, pats.get(m), key), g.replicas) for g in gs], weights)
        return out
