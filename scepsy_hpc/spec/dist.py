"""Distributions used wherever a workflow spec expects a quantity (tokens, counts, seconds).

A distribution is a plain number (constant) or a one-key mapping such as ``{lognormal: {mean: 250, cv: 0.5}}``.
Every quantity in a workflow is non-negative, so negative parameters are rejected at load time.
Samplers take a `random.Random` (fast scalar draws, seedable); `mean()` is exact.
"""

from __future__ import annotations

import math
import random
from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Discriminator, Field, NonNegativeFloat, PositiveFloat, Tag, model_validator

from scepsy_hpc.spec.base import SpecModel

KINDS = ("constant", "uniform", "uniform_int", "normal", "lognormal", "geometric", "poisson", "exponential", "choice")


class _Dist(SpecModel):
    def sample(self, rng: random.Random) -> float:  # pragma: no cover - overridden
        """One draw."""
        raise NotImplementedError

    def mean(self) -> float:  # pragma: no cover - overridden
        """Exact mean of the distribution."""
        raise NotImplementedError


class Constant(_Dist):
    """A fixed value; a plain number in YAML means this."""

    constant: NonNegativeFloat

    def sample(self, rng: random.Random) -> float:
        return self.constant

    def mean(self) -> float:
        return self.constant


class _LowHigh(SpecModel):
    low: NonNegativeFloat
    high: NonNegativeFloat

    @model_validator(mode="after")
    def _ordered(self) -> "_LowHigh":
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) must not exceed high ({self.high:g}); swap them")
        return self


class Uniform(_Dist):
    """Continuous uniform on [low, high]."""

    uniform: _LowHigh

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.uniform.low, self.uniform.high)

    def mean(self) -> float:
        return (self.uniform.low + self.uniform.high) / 2


class _IntLowHigh(SpecModel):
    low: Annotated[int, Field(ge=0)]
    high: Annotated[int, Field(ge=0)]

    @model_validator(mode="after")
    def _ordered(self) -> "_IntLowHigh":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high}); swap them")
        return self


class UniformInt(_Dist):
    """Integer uniform on {low, …, high}, both ends included."""

    uniform_int: _IntLowHigh

    def sample(self, rng: random.Random) -> float:
        return rng.randint(self.uniform_int.low, self.uniform_int.high)

    def mean(self) -> float:
        return (self.uniform_int.low + self.uniform_int.high) / 2


class _MeanSd(SpecModel):
    mean: NonNegativeFloat
    sd: NonNegativeFloat


class Normal(_Dist):
    """Normal truncated at 0 (redrawn while negative); `mean()` is the truncated mean."""

    normal: _MeanSd

    def sample(self, rng: random.Random) -> float:
        mu, sd = self.normal.mean, self.normal.sd
        for _ in range(64):
            x = rng.gauss(mu, sd)
            if x >= 0:
                return x
        return 0.0

    def mean(self) -> float:
        mu, sd = self.normal.mean, self.normal.sd
        if sd == 0:
            return mu
        a = -mu / sd  # truncation point in standard units
        pdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
        tail = 0.5 * math.erfc(a / math.sqrt(2))
        return mu + sd * pdf / tail


class _MeanCv(SpecModel):
    mean: PositiveFloat
    cv: NonNegativeFloat


class LogNormal(_Dist):
    """Log-normal parameterised by its own mean and coefficient of variation."""

    lognormal: _MeanCv

    def sample(self, rng: random.Random) -> float:
        sigma2 = math.log1p(self.lognormal.cv**2)
        mu = math.log(self.lognormal.mean) - sigma2 / 2
        return rng.lognormvariate(mu, math.sqrt(sigma2))

    def mean(self) -> float:
        return self.lognormal.mean


class _GeoMean(SpecModel):
    mean: Annotated[float, Field(ge=1.0, description="mean of a geometric on {1, 2, …}; at least 1")]


class Geometric(_Dist):
    """Geometric on {1, 2, …} (number of trials to the first success) with the given mean."""

    geometric: _GeoMean

    def sample(self, rng: random.Random) -> float:
        p = 1.0 / self.geometric.mean
        if p >= 1.0:
            return 1.0
        u = 1.0 - rng.random()  # in (0, 1]
        return 1.0 + math.floor(math.log(u) / math.log1p(-p))

    def mean(self) -> float:
        return self.geometric.mean


class _Mean(SpecModel):
    mean: NonNegativeFloat


def _poisson(lam: float, rng: random.Random) -> int:
    """Exact Poisson draw: inversion for small means, Hörmann's PTRS rejection (1993) for large."""
    if lam <= 0:
        return 0
    if lam < 30:
        u, k, p = rng.random(), 0, math.exp(-lam)
        cdf = p
        while u > cdf:
            k += 1
            p *= lam / k
            cdf += p
            if k > 10_000:
                break
        return k
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2)
    while True:
        u = rng.random() - 0.5
        v = rng.random()
        us = 0.5 - abs(u)
        k = math.floor((2 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return k
        if k < 0 or (us < 0.013 and v > us):
            continue
        if math.log(v) + math.log(inv_alpha) - math.log(a / (us * us) + b) <= -lam + k * loglam - math.lgamma(k + 1):
            return k


class Poisson(_Dist):
    """Poisson with the given mean."""

    poisson: _Mean

    def sample(self, rng: random.Random) -> float:
        return _poisson(self.poisson.mean, rng)

    def mean(self) -> float:
        return self.poisson.mean


class Exponential(_Dist):
    """Exponential with the given mean."""

    exponential: _Mean

    def sample(self, rng: random.Random) -> float:
        m = self.exponential.mean
        return rng.expovariate(1.0 / m) if m > 0 else 0.0

    def mean(self) -> float:
        return self.exponential.mean


class _Choice(SpecModel):
    values: Annotated[list[NonNegativeFloat], Field(min_length=1)]
    weights: list[NonNegativeFloat] | None = None

    @model_validator(mode="after")
    def _weights_match(self) -> "_Choice":
        if self.weights is not None:
            if len(self.weights) != len(self.values):
                raise ValueError(
                    f"weights has {len(self.weights)} entries but values has {len(self.values)}; give one weight per value"
                )
            if sum(self.weights) <= 0:
                raise ValueError("weights sum to 0; give at least one positive weight")
        return self


class Choice(_Dist):
    """One of `values`, with probabilities proportional to `weights` (equal if omitted)."""

    choice: _Choice

    def sample(self, rng: random.Random) -> float:
        c = self.choice
        if c.weights is None:
            return c.values[rng.randrange(len(c.values))]
        return rng.choices(c.values, weights=c.weights, k=1)[0]

    def mean(self) -> float:
        c = self.choice
        w = c.weights or [1.0] * len(c.values)
        return sum(v * x for v, x in zip(c.values, w)) / sum(w)


def _tag(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, dict) and len(value) == 1:
        key = next(iter(value))
        return key if key in KINDS else None
    if isinstance(value, Constant | Uniform | UniformInt | Normal | LogNormal | Geometric | Poisson | Exponential | Choice):
        return next(iter(type(value).model_fields))
    return None


def _number_to_constant(value: Any) -> Any:
    return {"constant": value} if isinstance(value, (int, float)) and not isinstance(value, bool) else value


Dist = Annotated[
    Union[
        Annotated[Constant, Tag("constant")],
        Annotated[Uniform, Tag("uniform")],
        Annotated[UniformInt, Tag("uniform_int")],
        Annotated[Normal, Tag("normal")],
        Annotated[LogNormal, Tag("lognormal")],
        Annotated[Geometric, Tag("geometric")],
        Annotated[Poisson, Tag("poisson")],
        Annotated[Exponential, Tag("exponential")],
        Annotated[Choice, Tag("choice")],
    ],
    Discriminator(
        _tag,
        custom_error_type="distribution",
        custom_error_message="expected a non-negative number or a one-key mapping with one of: " + ", ".join(KINDS),
    ),
    BeforeValidator(_number_to_constant),
]
"""A distribution field; a plain number is a constant."""

AnyDist = Union[Constant, Uniform, UniformInt, Normal, LogNormal, Geometric, Poisson, Exponential, Choice]
