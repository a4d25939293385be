"""Distributions: sample means match `.mean()`, supports are right, draws are reproducible."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from pydantic import TypeAdapter, ValidationError

from scepsy_hpc.spec.dist import Dist

ADAPTER = TypeAdapter(Dist)
N = 50_000


def dist(value):
    return ADAPTER.validate_python(value)


def draws(d, n: int = N, seed: int = 12345) -> list[float]:
    rng = random.Random(seed)
    return [d.sample(rng) for _ in range(n)]


CASES = {
    "number": (250, 0.0),
    "constant": ({"constant": 7.5}, 0.0),
    "uniform": ({"uniform": {"low": 10, "high": 30}}, 0.03),
    "uniform_int": ({"uniform_int": {"low": 3, "high": 8}}, 0.03),
    "normal": ({"normal": {"mean": 1500, "sd": 300}}, 0.03),
    "normal_truncated": ({"normal": {"mean": 1, "sd": 2}}, 0.03),
    "lognormal": ({"lognormal": {"mean": 250, "cv": 0.5}}, 0.03),
    "lognormal_heavy": ({"lognormal": {"mean": 400, "cv": 1.5}}, 0.05),
    "geometric": ({"geometric": {"mean": 4}}, 0.03),
    "poisson": ({"poisson": {"mean": 3}}, 0.03),
    "poisson_large": ({"poisson": {"mean": 200}}, 0.03),
    "exponential": ({"exponential": {"mean": 0.8}}, 0.03),
    "choice": ({"choice": {"values": [1, 2, 10], "weights": [1, 1, 2]}}, 0.03),
    "choice_equal": ({"choice": {"values": [4, 8, 12]}}, 0.03),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sample_mean_matches_mean(name):
    spec, rel_tol = CASES[name]
    d = dist(spec)
    xs = draws(d)
    m = d.mean()
    assert m > 0
    assert statistics.fmean(xs) == pytest.approx(m, rel=rel_tol, abs=1e-12)
    assert min(xs) >= 0


def test_exact_means_by_hand():
    assert dist(250).mean() == 250
    assert dist({"uniform": {"low": 10, "high": 30}}).mean() == 20
    assert dist({"uniform_int": {"low": 3, "high": 8}}).mean() == 5.5
    assert dist({"choice": {"values": [1, 2, 10], "weights": [1, 1, 2]}}).mean() == pytest.approx(23 / 4)
    assert dist({"choice": {"values": [4, 8, 12]}}).mean() == pytest.approx(8)
    assert dist({"normal": {"mean": 100, "sd": 0}}).mean() == 100
    # Truncated normal mean: mu + sd * phi(a) / (1 - Phi(a)), a = -mu/sd.
    mu, sd = 1.0, 2.0
    a = -mu / sd
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    tail = 1 - 0.5 * (1 + math.erf(a / math.sqrt(2)))
    assert dist({"normal": {"mean": mu, "sd": sd}}).mean() == pytest.approx(mu + sd * phi / tail, rel=1e-12)
    assert dist({"normal": {"mean": mu, "sd": sd}}).mean() > mu


def test_plain_number_is_constant():
    d = dist(42)
    assert type(d).__name__ == "Constant"
    rng = random.Random(0)
    assert {d.sample(rng) for _ in range(10)} == {42}


def test_geometric_support_is_positive_integers():
    xs = draws(dist({"geometric": {"mean": 4}}))
    assert min(xs) >= 1
    assert all(x == int(x) for x in xs)
    assert min(xs) == 1  # P(X=1) = 1/4: certainly drawn
    # P(X=1) = p = 1/mean
    assert xs.count(1) / len(xs) == pytest.approx(0.25, abs=0.01)


def test_geometric_mean_one_is_always_one():
    xs = draws(dist({"geometric": {"mean": 1}}), n=1000)
    assert set(xs) == {1}


def test_uniform_int_covers_both_ends_and_nothing_else():
    xs = draws(dist({"uniform_int": {"low": 3, "high": 8}}))
    assert set(xs) == {3, 4, 5, 6, 7, 8}
    assert all(x == int(x) for x in xs)
    for v in range(3, 9):
        assert xs.count(v) / len(xs) == pytest.approx(1 / 6, abs=0.01)


def test_uniform_stays_in_range():
    xs = draws(dist({"uniform": {"low": 10, "high": 30}}))
    assert 10 <= min(xs) < 10.1
    assert 29.9 < max(xs) <= 30


def test_normal_is_truncated_at_zero():
    d = dist({"normal": {"mean": 1, "sd": 2}})
    xs = draws(d)
    assert min(xs) >= 0
    # An untruncated N(1, 2) would have ~31% negatives; truncation must lift the mean above mu.
    assert statistics.fmean(xs) > 1.3


@pytest.mark.parametrize("lam", [3, 200])
def test_poisson_mean_and_variance(lam):
    xs = draws(dist({"poisson": {"mean": lam}}))
    assert all(x == int(x) and x >= 0 for x in xs)
    assert statistics.fmean(xs) == pytest.approx(lam, rel=0.02)
    assert statistics.pvariance(xs) == pytest.approx(lam, rel=0.05)


def test_poisson_small_mean_pmf_at_zero():
    xs = draws(dist({"poisson": {"mean": 3}}))
    assert xs.count(0) / len(xs) == pytest.approx(math.exp(-3), abs=0.005)


def test_poisson_zero_mean():
    assert set(draws(dist({"poisson": {"mean": 0}}), n=100)) == {0}


def test_lognormal_cv():
    xs = draws(dist({"lognormal": {"mean": 250, "cv": 0.5}}))
    cv = statistics.pstdev(xs) / statistics.fmean(xs)
    assert cv == pytest.approx(0.5, rel=0.05)
    assert min(xs) > 0


def test_exponential_variance_and_zero_mean():
    xs = draws(dist({"exponential": {"mean": 0.8}}))
    assert statistics.pstdev(xs) == pytest.approx(0.8, rel=0.03)
    assert set(draws(dist({"exponential": {"mean": 0}}), n=100)) == {0}


def test_choice_only_yields_values():
    xs = draws(dist({"choice": {"values": [1, 2, 10], "weights": [1, 1, 2]}}))
    assert set(xs) == {1, 2, 10}
    assert xs.count(10) / len(xs) == pytest.approx(0.5, abs=0.01)
    assert set(draws(dist({"choice": {"values": [5]}}), n=50)) == {5}


def test_choice_zero_weight_value_never_drawn():
    xs = draws(dist({"choice": {"values": [1, 2], "weights": [0, 1]}}), n=2000)
    assert set(xs) == {2}


@pytest.mark.parametrize("name", list(CASES))
def test_same_seed_same_draws(name):
    d = dist(CASES[name][0])
    assert draws(d, n=500, seed=7) == draws(d, n=500, seed=7)


@pytest.mark.parametrize("name", [n for n, (_, tol) in CASES.items() if tol > 0])
def test_different_seed_different_draws(name):
    d = dist(CASES[name][0])
    assert draws(d, n=200, seed=1) != draws(d, n=200, seed=2)


@pytest.mark.parametrize("bad", [
    -1,
    True,
    "abc",
    {"gamma": {"mean": 1}},
    {"normal": {"mean": 1, "sd": 1}, "uniform": {"low": 0, "high": 1}},
    {"uniform": {"low": 5, "high": 2}},
    {"uniform_int": {"low": 1.5, "high": 2}},
    {"lognormal": {"mean": 5}},
    {"lognormal": {"mean": 0, "cv": 1}},
    {"geometric": {"mean": 0.5}},
    {"poisson": {"mean": -1}},
    {"choice": {"values": []}},
    {"choice": {"values": [1, 2], "weights": [1]}},
    {"choice": {"values": [1, 2], "weights": [0, 0]}},
    {"normal": {"mean": 1, "sd": 1, "skew": 2}},
])
def test_invalid_distributions_rejected(bad):
    with pytest.raises(ValidationError):
        ADAPTER.validate_python(bad)
