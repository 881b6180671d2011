"""bench-routing's wall ratio, its spread over repeats, and the wall-follows-FLOPs bar's verdict."""

from __future__ import annotations

import math

import pytest

from cascade_bench.bench.routing import paired_ratio, paired_ratios, wall_bar_check
from cascade_bench.measure.timing import quartiles


def test_paired_ratios_divide_each_repeat_by_the_full_pass_of_the_same_repeat():
    # Drift between repeats (the full pass 10 -> 20 ms) stays out of each ratio.
    assert paired_ratios([8.0, 16.0, 18.0], [10.0, 20.0, 20.0]) == (0.8, 0.8, 0.9)
    assert paired_ratio([8.0, 16.0, 18.0], [10.0, 20.0, 20.0]) == 0.8


@pytest.mark.parametrize("samples, reference", [([1.0], [1.0, 2.0]), ([], [])])
def test_paired_ratios_need_one_reference_per_sample(samples, reference):
    with pytest.raises(ValueError, match="one reference time per sample"):
        paired_ratios(samples, reference)


def test_quartiles_inclusive():
    # Inclusive quartiles of 1..5 are the 2nd and 4th values; of one value, the value twice.
    assert quartiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (2.0, 4.0)
    assert quartiles([0.7]) == (0.7, 0.7)
    assert all(math.isnan(q) for q in quartiles([]))


def test_wall_bar_is_met_by_the_median_and_says_when_the_limit_lies_within_the_spread():
    # FLOP ratio 0.8 and bar 1.05: the limit is 0.84.
    description, met = wall_bar_check("hard 50% routed", 0.85, (0.83, 0.87), 0.8, 1.05)
    assert not met
    assert (
        "wall ratio 0.850 (repeats' quartiles 0.830-0.870; the limit lies between them: within this run's spread)"
        in description
    )
    assert "(= 0.840)" in description
    description, met = wall_bar_check("hard 50% routed", 0.82, (0.81, 0.83), 0.8, 1.05)
    assert met and "limit lies between" not in description
    description, met = wall_bar_check("hard 50% routed", 0.90, (0.88, 0.92), 0.8, 1.05)
    assert not met and "limit lies between" not in description
