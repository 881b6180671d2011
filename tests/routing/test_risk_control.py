"""Risk-controlled calibration: the binomial tail, fixed-sequence testing on synthetic confidences
whose true risk is known, and the ensemble-level calibration."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_bench.routing.calibration import calibrate_thresholds
from cascade_bench.routing.risk_control import (
    RISK_GRID,
    binomial_cdf,
    binomial_upper_bound,
    fixed_sequence_test,
    risk_controlled_thresholds,
    routed_violations,
)
from tests.helpers import tiny_ensemble, token_batch


def test_binomial_cdf_matches_hand_sums():
    assert binomial_cdf(5, 10, 0.5) == pytest.approx(638 / 1024, rel=1e-12)
    assert binomial_cdf(0, 10, 0.5) == pytest.approx(1 / 1024, rel=1e-12)
    assert binomial_cdf(2, 7, 0.3) == pytest.approx(
        sum(math.comb(7, i) * 0.3**i * 0.7 ** (7 - i) for i in range(3)), rel=1e-12
    )
    assert binomial_cdf(10, 10, 0.9) == 1.0 and binomial_cdf(-1, 10, 0.1) == 0.0


def test_upper_bound_with_no_violations_is_the_closed_form():
    # P(Bin(n, p) <= 0) = (1 - p)^n = epsilon  =>  p = 1 - epsilon^(1/n)
    assert binomial_upper_bound(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    assert binomial_upper_bound(30, 100, 0.05) > 0.30


def _synthetic_violations(seed: int, tokens: int, thresholds: list[float]) -> list[int]:
    """Confidence c ~ U(0, 1); a token exiting at threshold t is wrong with probability 1 - c, so the
    true risk at t is integral_t^1 (1 - c) dc = (1 - t)^2 / 2."""
    generator = torch.Generator().manual_seed(seed)
    confidence = torch.rand(tokens, generator=generator, dtype=torch.float64)
    wrong = torch.rand(tokens, generator=generator, dtype=torch.float64) < 1 - confidence
    return [int(((confidence >= t) & wrong).sum()) for t in thresholds]


def test_fixed_sequence_testing_keeps_its_bound_over_seeds():
    delta, epsilon, tokens, seeds = 0.05, 0.1, 2000, 300
    thresholds = [1 - 0.01 * j for j in range(1, 80)]  # most cautious first
    true_risk = [(1 - t) ** 2 / 2 for t in thresholds]
    controlled_misses, naive_misses, chosen_risks = 0, 0, []
    for seed in range(seeds):
        violations = _synthetic_violations(seed, tokens, thresholds)
        chosen, _ = fixed_sequence_test(violations, tokens, delta, epsilon)
        risk = true_risk[chosen] if chosen >= 0 else 0.0
        controlled_misses += risk > delta
        chosen_risks.append(risk)
        # The quantile-style choice: the most aggressive threshold whose empirical risk is <= delta.
        naive = max(j for j, v in enumerate(violations) if v / tokens <= delta)
        naive_misses += true_risk[naive] > delta
    # Binomial slack of 3 standard deviations on the epsilon level over the seeds.
    assert controlled_misses / seeds <= epsilon + 3 * math.sqrt(epsilon * (1 - epsilon) / seeds)
    assert naive_misses / seeds > 0.3  # without the guarantee the bound fails often
    assert sum(chosen_risks) / seeds > 0.6 * delta  # and the guarantee is not bought by never exiting


def test_fixed_sequence_stops_at_the_first_failure():
    chosen, p_values = fixed_sequence_test([0, 0, 500, 0], 1000, 0.1, 0.1)
    assert chosen == 1 and len(p_values) == 3 and p_values[2] > 0.1


def test_no_exit_has_no_violations(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    batches = [token_batch(text, 2, 32, offset=400 * i) for i in range(2)]
    for risk in ("disagreement", "nll_increase"):
        violations, tokens = routed_violations(ensemble, batches, [math.inf], risk)
        assert violations == 0 and tokens == 2 * 2 * 31


def test_risk_controlled_thresholds_on_an_ensemble(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    batches = [token_batch(text, 2, 32, offset=300 * i) for i in range(6)]
    result = risk_controlled_thresholds(ensemble, batches, delta=0.3, epsilon=0.2)
    assert result.candidates == RISK_GRID[: len(result.p_values)]
    if result.hard_ratio is None:
        assert ensemble.thresholds[0] == math.inf
    else:
        assert ensemble.thresholds[:1] == result.thresholds
        assert result.empirical_risk <= result.upper_bound
        assert all(p <= 0.2 for p in result.p_values[: RISK_GRID.index(result.hard_ratio) + 1])
        # what it certified is what the routed pass does on the testing half
        assert routed_violations(ensemble, batches[1::2], result.thresholds) == (result.violations, result.tokens)


def test_when_no_candidate_passes_nobody_exits_and_the_bound_is_exact(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    batches = [token_batch(text, 2, 32, offset=300 * i) for i in range(4)]
    # 124 tokens on the testing half: even 0 violations give p = (1 - 1e-4)^124 > 0.1, so nothing passes
    result = risk_controlled_thresholds(ensemble, batches, delta=1e-4, epsilon=0.1)
    assert result.hard_ratio is None and result.thresholds == (math.inf,) and ensemble.thresholds[0] == math.inf
    assert (result.bound, result.upper_bound, result.violations) == ("exact", 0.0, 0)
    # the reported bound holds: the thresholds returned route nobody out, so nothing disagrees
    assert routed_violations(ensemble, batches[1::2], result.thresholds) == (0, result.tokens)
    assert result.first_candidate_bound == binomial_upper_bound(
        routed_violations(ensemble, batches[1::2], calibrate_thresholds(ensemble, batches[0::2], RISK_GRID[0]))[0],
        result.tokens,
        0.1,
    )
    assert result.summary()["bound"] == "exact"


def test_risk_control_errors_name_the_value(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    one = [token_batch(text, 2, 16)]
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        risk_controlled_thresholds(ensemble, one)
    with pytest.raises(ValueError, match=r"delta must be a number in \(0, 1\), got 1.5"):
        risk_controlled_thresholds(ensemble, one * 2, delta=1.5)
    with pytest.raises(ValueError, match="risk must be one of"):
        risk_controlled_thresholds(ensemble, one * 2, risk="kl")
    with pytest.raises(ValueError, match="most cautious"):
        risk_controlled_thresholds(ensemble, one * 2, grid=[0.2, 0.8])
