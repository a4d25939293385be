"""The ALP predictors on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from scepsy_hpc.errors import SpecError
from scepsy_hpc.predict.alp import pooling_factor, predict, predict_cp, predict_paper
from scepsy_hpc.profile.table import ProfilePoint, ProfileTable
from scepsy_hpc.workload.sampler import Call, Tool
from scepsy_hpc.trace.graph import from_sample
from scepsy_hpc.trace.stats import aggregate


def flat(llm: str, a: float, tpot: float = 0.0, b: float = 0.0, cap: float = 10.0, slope: float = 0.0) -> ProfileTable:
    """Per-call latency a + b·prompt + tpot·(out−1), plus `slope`·rate (seconds per call/s)."""
    pts = tuple(ProfilePoint(r, r, 100, a + slope * r, a, a, a, a, a + slope * r, b, tpot) for r in (0.01, 2.0, 4.0, 8.0))
    return ProfileTable(llm, llm, "h100-sxm", 1, 1.0, cap, pts)


def graphs_of(seqs, profiles):
    un = {m: p.unloaded for m, p in profiles.items()}
    return [from_sample(f"s{i}", s, lambda c: un[c.llm].call_latency(c.prompt_tokens, c.output_tokens))
            for i, s in enumerate(seqs)]


def test_paper_formula_and_throughput():
    # a: one call; then b fanned out 4 wide (all 4 in parallel): n_b = 4, p_b = 4.
    seq = [Call("a", None, 1, 1), [[Call("b", None, 1, 1)] for _ in range(4)]]
    prof = {"a": flat("a", 2.0, cap=3.0, slope=0.5), "b": flat("b", 1.0, cap=10.0, slope=0.25)}
    g = graphs_of([seq], prof)
    st = aggregate(g)
    assert st.per_llm["b"].n == 4 and st.per_llm["b"].p == pytest.approx(4.0)
    rate = 0.5
    pr = predict_paper(st, prof, {"a": 1, "b": 2}, rate)
    # a: load 0.5/1 -> L = 2 + 0.25 ; b: load 0.5·4/2 = 1 -> L = 1 + 0.25 ; b term 1.25·4/4
    la = prof["a"].latency_at(0.5)
    lb = prof["b"].latency_at(1.0)
    assert pr.latency_s == pytest.approx(la * 1 + lb * 4 / 4)
    # throughput: a 1·3/1 = 3, b 2·10/4 = 5 -> 3, bottleneck a
    assert pr.throughput_rps == pytest.approx(3.0) and pr.bottleneck_llm == "a"
    assert pr.per_llm["b"].load_rps == pytest.approx(1.0)
    assert math.isinf(predict_paper(st, prof, {"a": 1, "b": 2}, 3.5).latency_s)


def test_cp_keeps_concurrency_between_llms_and_tools():
    # a and b run at the same time (parallel), then a 5 s tool: the paper sums a and b, cp takes max.
    seq = [[[Call("a", None, 1, 1)], [Call("b", None, 1, 1)]], Tool("search", 5.0)]
    prof = {"a": flat("a", 3.0), "b": flat("b", 2.0)}
    g = graphs_of([seq], prof)
    st = aggregate(g)
    cp = predict_cp(g, prof, {"a": 1, "b": 1}, 0.1, st)
    pp = predict_paper(st, prof, {"a": 1, "b": 1}, 0.1)
    assert cp.latency_s == pytest.approx(3.0 + 5.0)
    assert cp.tool_s == pytest.approx(5.0)
    assert pp.latency_s == pytest.approx(3.0 + 2.0)  # serial stages, no tool time: the paper's known errors
    assert cp.per_llm["a"].stage_s == pytest.approx(3.0) and cp.per_llm["b"].stage_s == 0.0


def test_cp_prices_roles_by_their_own_sizes():
    # one LLM, two roles: 100 output tokens vs 1000; per-token 0.01 s
    seq = [Call("m", "short", 10, 101), Call("m", "long", 10, 1001)]
    prof = {"m": flat("m", 0.0, tpot=0.01)}
    g = graphs_of([seq], prof)
    cp = predict("alp-cp", g, prof, {"m": 1}, 0.1)
    assert cp.latency_s == pytest.approx(1.0 + 10.0)


def test_fanout_burst_waits_for_prompts_ahead():
    # 3 calls released together on one replica; ttft slope 0.001 s/token, 1000-token prompts
    seq = [[[Call("m", None, 1000, 1)] for _ in range(3)]]
    prof = {"m": flat("m", 0.0, b=0.001)}
    g = graphs_of([seq], prof)
    one = predict_cp(g, prof, {"m": 1}, 0.1)
    assert one.latency_s == pytest.approx(3.0)  # the last waits for 3000 prompt tokens
    three = predict_cp(g, prof, {"m": 3}, 0.1)
    assert three.latency_s == pytest.approx(1.0)  # one per replica


def test_pooling_factor():
    assert pooling_factor(1, 0.9) == 1.0
    assert pooling_factor(4, 0.9) < pooling_factor(2, 0.9) < 1.0
    # Sakasegawa at c=4, ρ=0.8: ρ^(√10−2)/4
    assert pooling_factor(4, 0.8) == pytest.approx(0.8 ** (math.sqrt(10) - 2) / 4)


def test_missing_profile_and_unknown_predictor():
    seq = [Call("a", None, 1, 1)]
    prof = {"a": flat("a", 1.0)}
    g = graphs_of([seq], prof)
    with pytest.raises(SpecError) as e:
        predict_cp(g, {}, {"a": 1}, 0.1)
    assert "no profile for LLM(s) a" in str(e.value)
    with pytest.raises(SpecError) as e2:
        predict("alp-x", g, prof, {"a": 1}, 0.1)
    assert "alp-cp, alp-paper" in str(e2.value)
