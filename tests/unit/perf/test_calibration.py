"""Each published vLLM measurement is reproduced by the performance model within its tolerance."""

from __future__ import annotations

import pytest

from scepsy_hpc.perf.calibration import POINTS, predict


@pytest.mark.parametrize("point", POINTS, ids=[p.id for p in POINTS])
def test_calibration_point_holds(point, models, gpus):
    predicted = predict(point, models, gpus)
    error = abs(predicted - point.measured) / point.measured
    assert error <= point.tolerance, (
        f"{point.id} ({point.source}): measured {point.measured * 1e3:.2f} ms, model {predicted * 1e3:.2f} ms, "
        f"error {error:.1%} > {point.tolerance:.0%}"
    )


def test_points_cover_the_tuned_gpus_and_tp_degrees():
    assert {p.gpu for p in POINTS} >= {"h100-sxm", "a100-80gb", "a100-40gb", "h200"}
    assert {p.tp for p in POINTS} >= {1, 2, 4}
    assert all(p.source and p.quote for p in POINTS)
