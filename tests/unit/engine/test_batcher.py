"""The sim engine's scheduler, driven on model time without sleeping."""

from __future__ import annotations

import random

import pytest

from scepsy_hpc.engine.batcher import ABORTED, Batcher
from scepsy_hpc.perf.model import EngineConfig, EnginePerf
from scepsy_hpc.perf.replay import replay_calls
from scepsy_hpc.workload.sampler import Call
from scepsy_hpc.spec.catalog import GIB

MODEL, GPU = "llama-3.1-8b-instruct", "h100-sxm"


def _perf(models, gpus, **kw) -> EnginePerf:
    return EnginePerf(EngineConfig(models[MODEL], gpus[GPU], **kw))


def _run(b: Batcher, jobs: list[tuple[float, int, int]]):
    """Run (arrival, prompt, output) jobs to completion as the real-time driver would, minus the sleeps."""
    reqs, i, now, iters = [], 0, 0.0, []
    while i < len(jobs) or not b.idle():
        while i < len(jobs) and jobs[i][0] <= now:
            reqs.append(b.submit(i, jobs[i][1], jobs[i][2], jobs[i][0]))
            i += 1
        it = b.step(now)
        if it is None:
            now = jobs[i][0]  # idle until the next arrival
            continue
        assert b.num_running <= b.max_seqs and 0 <= b.kv_used <= b.kv_cap
        iters.append(it)
        now = it.end_s
    return reqs, iters


def test_single_request_latency_is_the_perf_models(models, gpus):
    perf = _perf(models, gpus, max_batched_tokens=1024)  # a 3000-token prompt takes 3 prefill chunks
    (req,), iters = _run(Batcher(perf), [(0.0, 3000, 50)])
    assert req.t_first == pytest.approx(perf.prefill_time(3000), rel=1e-12)
    assert req.t_end == pytest.approx(perf.request_latency(3000, 50), rel=1e-9)
    assert len(iters) == 3 + 49
    assert [it.emitted for it in iters[:2]] == [(), ()]  # no token before the prefill completes
    assert [n for it in iters for r, n in it.emitted] == list(range(1, 51))  # one token per iteration, counted
    assert req.generated == 50


def test_concurrent_requests_share_iterations(models, gpus):
    perf = _perf(models, gpus)
    (alone,), _ = _run(Batcher(perf), [(0.0, 200, 300)])
    (a, b), iters = _run(Batcher(perf), [(0.0, 200, 300), (0.0, 200, 300)])
    assert len(iters) == 300  # both prefill in the first iteration, then decode together
    assert a.t_end == b.t_end
    assert alone.t_end < a.t_end < 1.2 * alone.t_end  # decode is memory-bound: a second sequence is cheap


def test_max_num_seqs_caps_admission(models, gpus):
    perf = _perf(models, gpus, max_num_seqs=2)
    b = Batcher(perf)
    for rid, out in enumerate((10, 20, 5)):
        b.submit(rid, 100, out, 0.0)
    b.step(0.0)
    assert (b.num_running, b.num_waiting) == (2, 1)
    (r0, r1, r2), _ = _run(Batcher(perf), [(0.0, 100, 10), (0.0, 100, 20), (0.0, 100, 5)])
    assert r2.t_admit == r0.t_end  # the third waits for the first slot that frees
    assert r2.t_admit > r1.t_admit == 0.0


def test_kv_reservation_blocks_admission(models, gpus):
    m, g = models[MODEL], gpus[GPU]
    # A GPU share whose KV cache holds about 4000 tokens (EnginePerf's capacity formula solved for f).
    frac = (g.reserved_gib + m.weight_bytes / GIB + 4000 * m.kv_bytes_per_token / GIB) / (g.mem_gib * 0.9)
    perf = _perf(models, gpus, gpu_frac=frac)
    assert 3900 < perf.kv_capacity_tokens < 4100
    b = Batcher(perf)
    (first, second), iters = _run(b, [(0.0, 2000, 400), (0.0, 2000, 400)])  # 2400 each: only one fits
    assert second.t_admit == first.t_end
    assert b.kv_used == 0
    with pytest.raises(ValueError) as exc:
        b.submit(9, 4000, 200, 0.0)
    assert "exceed the KV cache" in str(exc.value)


def test_abort_frees_the_slot_and_kv(models, gpus):
    b = Batcher(_perf(models, gpus))
    r = b.submit(0, 100, 1000, 0.0)
    b.step(0.0)
    assert b.kv_used == 1100 and b.num_running == 1
    assert b.abort(0) and not b.abort(0)
    assert r.state == ABORTED and b.kv_used == 0 and b.idle()
    assert b.step(1.0) is None


def test_arrivals_are_admitted_only_once_they_have_happened(models, gpus):
    b = Batcher(_perf(models, gpus))
    b.submit(0, 100, 5, t_arrive=2.0)
    assert b.step(1.0) is None
    it = b.step(2.0)
    assert it is not None and it.start_s == 2.0 and b.num_running == 1


def test_matches_the_discrete_event_simulator(models, gpus):
    """Same decisions as scepsy_hpc.perf.engine on a loaded random trace: admission, first token, end."""
    cfg = EngineConfig(models[MODEL], gpus[GPU], max_num_seqs=8, max_batched_tokens=2048)
    rng = random.Random(7)
    calls = [Call("m", None, rng.randint(50, 3000), rng.randint(1, 400)) for _ in range(60)]
    t, arrivals = 0.0, []
    for _ in calls:
        t += rng.expovariate(6.0)  # enough load to queue behind max_num_seqs
        arrivals.append(t)
    records = sorted(replay_calls(cfg, calls, arrivals), key=lambda r: r.request)
    reqs, _ = _run(Batcher(EnginePerf(cfg)), [(a, c.prompt_tokens, c.output_tokens) for a, c in zip(arrivals, calls)])
    assert len(records) == len(reqs) == 60
    assert any(r.t_admit > r.t_submit for r in records)  # the trace does queue
    for rec, req in zip(records, reqs):
        assert (req.t_admit, req.t_first, req.t_end) == pytest.approx((rec.t_admit, rec.t_first, rec.t_end), rel=1e-9, abs=1e-9)
