"""Replaying calls on pooled simulated engines: routing, the shared queue, every call once."""

from __future__ import annotations

from scepsy_hpc.perf.model import EngineConfig
from scepsy_hpc.perf.replay import replay_calls
from scepsy_hpc.workload.sampler import Call


def test_least_outstanding_routing_breaks_ties_round_robin(models, gpus):
    cfg = EngineConfig(models["llama-3.1-8b-instruct"], gpus["h100-sxm"])
    calls = [Call("m", None, 100, 50) for _ in range(4)]
    recs = replay_calls(cfg, calls, [0.0, 0.0, 0.0, 0.0], replicas=3)
    assert sorted(r.request for r in recs) == [0, 1, 2, 3]
    assert [r.replica for r in sorted(recs, key=lambda r: r.request)] == [0, 1, 2, 0]


def test_full_replicas_hold_calls_in_one_shared_queue(models, gpus):
    cfg = EngineConfig(models["llama-3.1-8b-instruct"], gpus["h100-sxm"], max_num_seqs=1, max_batched_tokens=2048)
    recs = replay_calls(cfg, [Call("m", None, 100, 20) for _ in range(6)], [0.0] * 6, replicas=2)
    by_req = sorted(recs, key=lambda r: r.request)
    assert len(recs) == 6 and all(r.t_admit >= r.t_submit for r in recs)
    # two run at once; the rest wait at the gateway and take the first slot that frees
    assert sum(1 for r in by_req if r.t_admit == 0.0) == 2
    assert [r.t_admit for r in by_req] == sorted(r.t_admit for r in by_req)
