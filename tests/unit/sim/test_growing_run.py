"""`GrowingRun`: the capacity judge's lengthened runs, each the very result a fresh `simulate` gives,
at the cost of the longest run plus each shorter one's drain (a forked copy drains it)."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from dataclasses import fields

import pytest

from scepsy_hpc.sim import simulate
from scepsy_hpc.sim.core import GrowingRun, _can_fork
from scepsy_hpc.spec.catalog import config_dir
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import load_workflow


def same(a, b) -> bool:
    """Equal in every field but the wall time (NaN equal to NaN)."""
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "wall_s":
            continue
        if isinstance(x, float) and math.isnan(x) and isinstance(y, float) and math.isnan(y):
            continue
        if x != y:
            return False
    return True


@pytest.mark.parametrize("name, alloc, rate", [
    # prefix reuse across turns, tools and a fan-out; past capacity (a backlog to drain) and below it
    ("react_agent", {"agent": LLMAlloc(tp=2, replicas=2), "summarizer": LLMAlloc(tp=1, replicas=2)}, 3.0),
    ("react_agent", {"agent": LLMAlloc(tp=1, replicas=1), "summarizer": LLMAlloc(tp=2)}, 9.0),
    ("tot_verifier", {"generator": LLMAlloc(tp=1, replicas=3), "verifier": LLMAlloc(gpu_frac=0.5, replicas=2)}, 1.0),
])
def test_each_length_is_what_a_fresh_simulation_gives(models, gpus, name, alloc, rate):
    wf = load_workflow(config_dir() / "workflows" / f"{name}.yaml", models)
    gpu = gpus["h100-sxm"]
    grow = GrowingRun(wf, alloc, gpu, models, rate_rps=rate, seed=4)
    lengths = [20, 40, 41, 160]
    for n in lengths:
        got, fresh = grow(n), simulate(wf, alloc, gpu, models, rate_rps=rate, n_requests=n, seed=4)
        assert got.requests == n and same(got, fresh), n
    # a length not above the last one is simulated afresh, with the same result
    forked = grow.forked
    assert same(grow(40), simulate(wf, alloc, gpu, models, rate_rps=rate, n_requests=40, seed=4))
    assert grow.forked == forked
    if _can_fork():   # (threads in this process, a test's or numpy's BLAS pool, make it simulate afresh: the same)
        assert forked == len(lengths)


def test_in_a_process_of_one_thread_each_length_is_drained_in_a_forked_copy():
    """The fork path taken (a fresh process: nothing else running), each result a fresh simulation's."""
    code = """
import math
from scepsy_hpc.sim import simulate
from scepsy_hpc.sim.core import GrowingRun, _can_fork
from scepsy_hpc.spec.catalog import config_dir, load_gpus, load_models
from scepsy_hpc.spec.plan import LLMAlloc
from scepsy_hpc.spec.workflow import load_workflow
models, gpus = load_models(), load_gpus()
wf = load_workflow(config_dir() / "workflows" / "plan_execute.yaml", models)
alloc = {n: LLMAlloc(tp=2) for n in wf.llms}
grow = GrowingRun(wf, alloc, gpus["h100-sxm"], models, rate_rps=1.5, seed=7)
for n in (25, 50, 100):
    a, b = grow(n), simulate(wf, alloc, gpus["h100-sxm"], models, rate_rps=1.5, n_requests=n, seed=7)
    assert (a.request_records, a.per_llm, a.events, a.throughput_rps) == (b.request_records, b.per_llm, b.events,
                                                                         b.throughput_rps), n
print(grow.forked)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3"]


def test_with_other_threads_it_simulates_afresh_and_gives_the_same(models, gpus):
    wf = load_workflow(config_dir() / "workflows" / "react_agent.yaml", models)
    alloc = {"agent": LLMAlloc(tp=2, replicas=2), "summarizer": LLMAlloc(tp=1, replicas=2)}
    gpu = gpus["h100-sxm"]
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    try:
        grow = GrowingRun(wf, alloc, gpu, models, rate_rps=3.0, seed=2)
        got = [grow(n) for n in (30, 60)]
    finally:
        stop.set()
        t.join()
    assert grow.forked == 0
    assert all(same(g, simulate(wf, alloc, gpu, models, rate_rps=3.0, n_requests=n, seed=2))
               for g, n in zip(got, (30, 60)))


def test_bad_arguments_are_refused(models, gpus):
    wf = load_workflow(config_dir() / "workflows" / "react_agent.yaml", models)
    alloc = {"agent": LLMAlloc(), "summarizer": LLMAlloc()}
    with pytest.raises(ValueError, match="rate_rps"):
        GrowingRun(wf, alloc, gpus["h100-sxm"], models, rate_rps=0.0)
    with pytest.raises(ValueError, match="max_requests"):
        GrowingRun(wf, alloc, gpus["h100-sxm"], models, rate_rps=1.0, max_requests=0)
    with pytest.raises(ValueError, match="at least one"):
        GrowingRun(wf, alloc, gpus["h100-sxm"], models, rate_rps=1.0)(0)


def test_a_copy_that_fails_costs_a_fresh_simulation_not_a_wrong_result(models, gpus, monkeypatch):
    import pickle

    def boom(*a, **k):
        raise RuntimeError("the copy fails")
    monkeypatch.setattr(pickle, "dumps", boom)   # only the forked copy pickles
    wf = load_workflow(config_dir() / "workflows" / "react_agent.yaml", models)
    alloc = {"agent": LLMAlloc(tp=2, replicas=2), "summarizer": LLMAlloc(tp=1, replicas=2)}
    gpu = gpus["h100-sxm"]
    grow = GrowingRun(wf, alloc, gpu, models, rate_rps=3.0, seed=5)
    got = grow(30)
    assert grow.forked == 0 and same(got, simulate(wf, alloc, gpu, models, rate_rps=3.0, n_requests=30, seed=5))
