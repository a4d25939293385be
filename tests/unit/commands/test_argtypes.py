"""Values are checked where argparse parses them: NaN, negative and zero are refused where they make
no sense, with a message that names the flag and the value (exit 2, no traceback)."""

from __future__ import annotations

import argparse

import pytest

from scepsy_hpc.cli import build_parser
from scepsy_hpc.commands import argtypes


def refused(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,flag,value", [
    (("simulate", "w", "--plan", "p", "--rate", "nan"), "--rate", "nan"),
    (("simulate", "w", "--plan", "p", "--rate", "-1"), "--rate", "-1"),
    (("simulate", "w", "--plan", "p", "--rate", "0"), "--rate", "0"),
    (("simulate", "w", "--plan", "p", "--rate", "1", "--requests", "0"), "--requests", "0"),
    (("simulate", "w", "--plan", "p", "--rate", "1", "--warmup", "1"), "--warmup", "1"),
    (("plan", "w", "--gpus", "0"), "--gpus", "0"),
    (("plan", "w", "--gpus", "-4"), "--gpus", "-4"),
    (("plan", "w", "--max-util", "nan"), "--max-util", "nan"),
    (("plan", "w", "--time-limit", "0"), "--time-limit", "0"),
    (("plan", "w", "--gap=-1e-6"), "--gap", "-1e-6"),
    (("plan", "w", "--latency-slo", "inf"), "--latency-slo", "inf"),
    (("plan", "w", "--target-rps", "nan"), "--target-rps", "nan"),
    (("plan", "w", "--target-rps", "a=-2"), "--target-rps", "a=-2"),
    (("plan", "w", "--samples", "x"), "--samples", "x"),
    (("plan", "w", "--seed", "-1"), "--seed", "-1"),
    (("bench", "--gpus", "8,0"), "--gpus", "8,0"),
    (("bench", "--gpus", "8,x"), "--gpus", "8,x"),
    (("bench", "--policies", "equal"), "--policies", "equal"),
    (("bench", "--jobs", "-2"), "--jobs", "-2"),
    (("profile", "w", "--gpu-frac", "0.5,1.5"), "--gpu-frac", "0.5,1.5"),
    (("profile", "w", "--start-frac", "1"), "--start-frac", "1"),
    (("up", "w", "--time", "four hours"), "--time", "four hours"),
    (("daemon", "start", "--gateway-port", "70000"), "--gateway-port", "70000"),
    (("up", "w", "--time-scale", "0"), "--time-scale", "0"),
    (("down", "--timeout", "-5"), "--timeout", "-5"),
    (("drive", "--concurrency", "0"), "--concurrency", "0"),
    (("trace", "w", "--time-scale", "nan"), "--time-scale", "nan"),
])
def test_bad_values_are_refused_naming_flag_and_value(capsys, argv, flag, value):
    err = refused(capsys, *argv)
    assert f"argument {flag}" in err and value in err, err
    assert "Traceback" not in err


def test_good_values_parse_to_plain_values():
    a = build_parser().parse_args(["bench", "--gpus", "8, 16", "--policies", "milp,equal", "--workflows", "a,b"])
    assert (a.gpu_counts, a.policies, a.workflows) == ([8, 16], ["milp", "equal"], ["a", "b"])
    p = build_parser().parse_args(["plan", "w", "--target-rps", "a=2,b=3.5", "--gap", "0"])
    assert p.target_rps == [("a", 2.0), ("b", 3.5)] and p.gap == 0.0
    f = build_parser().parse_args(["profile", "w"])
    assert (f.tp, f.gpu_frac) == ([1, 2, 4], [0.25, 0.5, 1.0])   # string defaults go through the type
    u = build_parser().parse_args(["up", "w", "--time", "1-12:00:00"])
    assert u.time == "1-12:00:00" and u.cutover_margin == 60.0 and u.detach is False


@pytest.mark.parametrize("fn,text", [(argtypes.positive_float, "nan"), (argtypes.positive_float, "inf"),
                                     (argtypes.fraction, "0"), (argtypes.open_fraction, "1"),
                                     (argtypes.warmup_fraction, "-0.1"), (argtypes.non_negative_int, "-1"),
                                     (argtypes.positive_int, "1.5"), (argtypes.walltime, "1:2:3:4")])
def test_type_functions_name_the_value(fn, text):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        fn(text)
    assert text in str(e.value)


def test_every_command_has_json_false_unless_asked():
    """main() reads args.json for every command (the JSON error document)."""
    for argv in (["status"], ["down"], ["topology", "show", "--nvml"], ["validate", "x"]):
        assert build_parser().parse_args(argv).json is False
    assert build_parser().parse_args(["status", "--json"]).json is True
