"""Hostile command-line values: NaN, infinity, huge counts; argparse must refuse each naming the flag."""

from __future__ import annotations

from typing import Iterator

from corpus_specs import Case

WF = "configs/workflows/rag_rerank.yaml"
PLAN = "configs/plans/rag_rerank.yaml"


def cli_cases() -> Iterator[Case]:
    """(command, flag, value) triples that must be refused with the flag named."""
    floats = ("nan", "inf", "-inf", "1e999", "NaN", "-1", "abc", "")
    triples = [("simulate", ("simulate", PLAN), "--rate", v) for v in floats]
    triples += [("predict", ("predict", PLAN), "--rate", v) for v in ("nan", "inf", "1e999")]
    triples += [("plan", ("plan", WF), "--target-rps", v) for v in ("nan", "inf", "rag_rerank=nan", "x=inf,y=1", "-3")]
    triples += [("plan", ("plan", WF), "--gpus", v) for v in ("1000000000", "1e9", "-1", "0", "9" * 30, "4097")]
    triples += [("plan", ("plan", WF), flag, "nan") for flag in ("--max-util", "--throughput-tol", "--time-limit", "--gap", "--latency-slo")]
    triples += [("plan", ("plan", WF), flag, "inf") for flag in ("--time-limit", "--gap", "--latency-slo")]
    triples += [("plan", ("plan", WF), "--max-tp", "100000"), ("plan", ("plan", WF), "--samples", "100000000000"),
                ("plan", ("plan", WF), "--requests", "1" + "0" * 12)]
    triples += [("simulate", ("simulate", PLAN), "--requests", v) for v in ("100000000000", "1e12")]
    triples += [("bench", ("bench",), "--gpus", v) for v in ("8,1000000000", "8,nan")]
    triples += [("bench", ("bench",), "--resume", v) for v in ("/etc/passwd", "/tmp")]   # a file; a directory all may write
    triples += [("profile", ("profile", WF), flag, v) for flag, v in (("--gpu-frac", "nan"), ("--gpu-frac", "0.5,inf"),
                                                                     ("--tp", "1,100000"), ("--time-scale", "inf"),
                                                                     ("--calls", "1" + "0" * 15), ("--start-frac", "nan"))]
    triples += [("trace", ("trace", WF), flag, v) for flag, v in (("--rate", "nan"), ("--concurrency", "1" + "0" * 12))]
    triples += [("up", ("up", PLAN), "--max-requests", v) for v in ("0", "-1", "abc", "1e9", "9" * 30, "plans")]
    for cmd, head, flag, value in triples:
        yield Case(f"cli-{cmd}", f"{flag}={value}", {}, (*head, flag, value), line=False)
