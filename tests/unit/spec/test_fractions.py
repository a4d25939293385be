"""The one fraction packer: best-fit decreasing, and its closed form on the quarter grid."""

from __future__ import annotations

import itertools

import pytest

from scepsy_hpc.spec.fractions import fraction_bins, gpus_for_fractions, on_quarter_grid, quarter, quarter_gpus


@pytest.mark.parametrize("fracs,expected", [
    ([], 0),
    ([0.5], 1),
    ([0.5, 0.5], 1),
    ([0.5, 0.5, 0.5], 2),
    ([0.6, 0.6, 0.4, 0.4], 2),
    ([0.4, 0.6, 0.4, 0.6], 2),
    ([1 / 3] * 3, 1),
    ([0.34] * 3, 2),
    ([0.7, 0.7, 0.7], 3),
    ([0.25] * 8, 2),
    ([0.9, 0.1, 0.8, 0.2, 0.5, 0.5], 3),
])
def test_gpus_for_fractions(fracs, expected):
    assert gpus_for_fractions(fracs) == expected


def test_gpus_for_fractions_does_not_mutate_input():
    fracs = [0.2, 0.9, 0.5]
    gpus_for_fractions(fracs)
    assert fracs == [0.2, 0.9, 0.5]


def test_fraction_bins_is_best_fit_decreasing():
    assert fraction_bins([0.75, 0.5, 0.25, 0.5, 0.25]) == [[0, 2], [1, 3], [4]]


def test_closed_form_is_the_packer_on_the_quarter_grid():
    for n1, n2, n3 in itertools.product(range(10), repeat=3):
        fracs = [0.25] * n1 + [0.5] * n2 + [0.75] * n3
        assert quarter_gpus(n1, n2, n3) == gpus_for_fractions(fracs), (n1, n2, n3)


def test_quarter_sizes():
    assert [quarter(f) for f in (0.25, 0.5, 0.75, 1.0)] == [1, 2, 3, 0]
    assert on_quarter_grid(0.5) and not on_quarter_grid(0.3)
    with pytest.raises(KeyError):
        quarter(0.3)
