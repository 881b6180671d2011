"""The routed-exit estimate, by hand: cost ratios from the per-token multiply-adds, PPL mixing the exit's
and full depth's NLLs, and the threshold calibrated as the lowest that keeps PPL within tolerance."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_bench.measure.exit_estimate import ESTIMATE_NOTE, ExitCosts, TokenExits, at_threshold, calibrated_threshold


def _tokens():
    # three tokens; exiting costs NLL +0.3 on the first, +0.0 on the second, +3.0 on the third
    return TokenExits(
        confidence=torch.tensor([0.9, 0.8, 0.5], dtype=torch.float64),
        exit_nll=torch.tensor([1.3, 1.0, 4.0], dtype=torch.float64),
        full_nll=torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
    )


def test_the_cost_ratio_counts_layers_the_exit_and_the_heads():
    costs = ExitCosts(layer=10, exit_extra=5, head=40, num_layers=8)
    full = 8 * 10 + 40
    # nothing exits: 3 layers + exit + head for everyone, then 5 more layers + head
    assert costs.ratio(3, 0.0) == pytest.approx((30 + 5 + 40 + 50 + 40) / full)
    assert costs.ratio(3, 1.0) == pytest.approx((30 + 5 + 40) / full)
    assert costs.ratio(3, 0.5) == pytest.approx((30 + 5 + 40 + 0.5 * 90) / full)


def test_the_estimate_mixes_exit_and_full_depth_nll():
    estimate = at_threshold(_tokens(), 0.8, 3, ExitCosts(10, 5, 40, 8))
    assert estimate.exit_ratio == pytest.approx(2 / 3)
    assert estimate.ppl == pytest.approx(math.exp((1.3 + 1.0 + 1.0) / 3))
    assert estimate.full_ppl == pytest.approx(math.e)
    assert estimate.note == ESTIMATE_NOTE and "estimate" in estimate.as_dict()["note"]


def test_the_threshold_is_the_lowest_that_keeps_ppl_within_tolerance():
    tokens = _tokens()
    # exiting the top 1: mean NLL 1.1 (+0.1); top 2: 1.1 (+0.1); all 3: 2.1 (+1.1)
    assert calibrated_threshold(tokens, math.expm1(0.1) + 1e-9) == 0.8
    assert calibrated_threshold(tokens, math.expm1(0.05)) == math.inf  # not even the most confident token
    assert calibrated_threshold(tokens, math.expm1(1.2)) == 0.5
    tied = TokenExits(torch.tensor([0.9, 0.9]).double(), torch.tensor([1.0, 5.0]).double(), torch.ones(2).double())
    assert calibrated_threshold(tied, 0.01) == math.inf  # equal confidences exit together
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        calibrated_threshold(tokens, -0.1)
