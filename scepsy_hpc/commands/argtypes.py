"""argparse `type=` functions: a value is checked where it is parsed, and a bad one is refused as
`scepsy plan: error: argument --rate: -1: give a positive number` (argparse names the flag; the
message names the value and what is wanted). They return plain values: float, int, str, lists."""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable, Sequence, TypeVar

from scepsy_hpc.spec import limits
from scepsy_hpc.spec.limits import Limit

T = TypeVar("T")

# Slurm's walltime forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (the cluster spec's pattern)
WALLTIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")


def _float(text: str, *, finite_checked_by_caller: bool = False) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(x):
        raise argparse.ArgumentTypeError(f"{text}: not a number (NaN)")
    if math.isinf(x) and not finite_checked_by_caller:  # a caller with its own range message says it
        raise argparse.ArgumentTypeError(f"{text}: give a finite number")
    return x


def _int(text: str) -> int:
    if len(text.strip()) > 19:  # int() of a 5,000-digit string is refused by Python itself, after a while
        raise argparse.ArgumentTypeError(f"{text[:24]!r}…: a whole number of at most 19 digits")
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_float(text: str) -> float:
    """A finite number > 0 (rates, seconds, scales)."""
    x = _float(text, finite_checked_by_caller=True)
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"{text}: give a positive number")
    return x


def non_negative_float(text: str) -> float:
    """A finite number ≥ 0 (tolerances, gaps)."""
    x = _float(text, finite_checked_by_caller=True)
    if not (x >= 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"{text}: give a number ≥ 0")
    return x


def fraction(text: str) -> float:
    """A fraction in (0, 1]."""
    x = _float(text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"{text}: give a fraction in (0, 1]")
    return x


def open_fraction(text: str) -> float:
    """A fraction in (0, 1)."""
    x = _float(text)
    if not 0 < x < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a fraction in (0, 1)")
    return x


def warmup_fraction(text: str) -> float:
    """A fraction in [0, 1) (the share of the first requests left out)."""
    x = _float(text)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a fraction in [0, 1)")
    return x


def positive_int(text: str) -> int:
    """A whole number ≥ 1 (counts: GPUs, requests, samples, tp)."""
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number ≥ 1")
    return n


def bounded_int(limit: Limit) -> Callable[[str], int]:
    """A whole number from 1 to `limit` (spec.limits; its environment variable raises it)."""
    def parse(text: str) -> int:
        n = positive_int(text)
        if limit.exceeded(n):
            raise argparse.ArgumentTypeError(f"{text}: {limit.hint()}")
        return n
    parse.__name__ = f"at most {limit.what}"
    return parse


gpu_count = bounded_int(limits.GPUS)
"""GPUs to plan on: 1 to SCEPSY_MAX_GPUS (a billion would make the planner run away)."""
count = bounded_int(limits.REQUESTS)
"""Requests, samples, calls, concurrency: 1 to SCEPSY_MAX_REQUESTS."""


def non_negative_int(text: str) -> int:
    """A whole number ≥ 0 (seeds; 0 meaning "choose" for --jobs and ports)."""
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number ≥ 0")
    return n


def request_cap(text: str) -> int | str:
    """`up --max-requests`: a whole number ≥ 1, or `plan` (the plan's figure)."""
    if text.strip().lower() == "plan":
        return "plan"
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number ≥ 1 (requests in flight), or `plan`")
    return n


def port(text: str) -> int:
    """A TCP port, 0 meaning a free one."""
    n = non_negative_int(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"{text}: a port is at most 65535")
    return n


def walltime(text: str) -> str:
    """A Slurm walltime (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S), returned as given."""
    if not WALLTIME.match(text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r}: give a Slurm walltime such as 30, 4:00:00 or 1-12:00:00")
    return text.strip()


def _items(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def comma_list(each: Callable[[str], T], example: str) -> Callable[[str], list[T]]:
    """A comma list of values, each checked by `each`; at least one."""
    def parse(text: str) -> list[T]:
        items = _items(text)
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma list like {example}")
        try:
            return [each(x) for x in items]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{text}: {exc}; give a comma list like {example}") from None
    return parse


def int_list(each: Callable[[str], int] = positive_int, example: str = "8,16") -> Callable[[str], list[int]]:
    """A comma list of whole numbers, each checked by `each`; at least one."""
    return comma_list(each, example)


def float_list(each: Callable[[str], float] = positive_float, example: str = "0.25,0.5,1") -> Callable[[str], list[float]]:
    """A comma list of numbers, each checked by `each`; at least one."""
    return comma_list(each, example)


def name_list(text: str) -> list[str]:
    """A comma list of names (or files); at least one."""
    items = _items(text)
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma list of names")
    return items


def choice_list(choices: Sequence[str], required: Sequence[str] = ()) -> Callable[[str], list[str]]:
    """A comma list of names among `choices`, those of `required` included."""
    def parse(text: str) -> list[str]:
        items = _items(text)
        bad = [x for x in items if x not in choices]
        if not items or bad or any(r not in items for r in required):
            need = f", {', '.join(required)} included" if required else ""
            raise argparse.ArgumentTypeError(f"{text}: choose from {', '.join(choices)}{need}")
        return items
    return parse


def rates(text: str) -> list[tuple[str | None, float]]:
    """--target-rps: one rate for every workflow (`RPS`), or `WORKFLOW=RPS,...`; as (name or None, rate)."""
    out: list[tuple[str | None, float]] = []
    for part in text.split(","):
        name, _, val = part.rpartition("=")
        try:
            x = float(val)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: {val!r} is not a number; give RPS or WORKFLOW=RPS,...") from None
        if not (x > 0 and math.isfinite(x)):
            raise argparse.ArgumentTypeError(f"{text}: rates must be positive")
        out.append((name or None, x))
    return out


def parser_override(text: str) -> tuple[str, str]:
    """`LLM=NAME` or `NAME` (every LLM: `*`): an output parser or chat template for the engines of an LLM."""
    llm, sep, name = text.partition("=")
    if not sep or "/" in llm or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", llm):
        llm, name = "*", text
    if not name or len(name) > 4096 or "\0" in name:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME or LLM=NAME (a parser name, or a chat template path)")
    return llm, name
