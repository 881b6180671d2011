"""Risk-controlled calibration: thresholds with a statistical guarantee instead of a quantile.

Learn-then-Test with fixed-sequence testing (Angelopoulos et al. 2021; CALM uses it for early
exit). A token's **loss** under the routed pass is binary:

- ``"disagreement"``: its prediction (argmax at its exit stage) differs from the full cascade's;
- ``"nll_increase"``: its NLL at its exit stage exceeds the full cascade's by more than
  ``nll_tolerance`` nats.

The candidates are the quantile thresholds of a grid of hard ratios, from the most cautious down
(``RISK_GRID``), calibrated on one half of the calibration batches (even indices). On the other half
(odd indices) each candidate's violations k out of n tokens give the p-value of "risk > delta":
``P(Binomial(n, delta) <= k)``. Testing goes down the grid while p <= epsilon and keeps the last
candidate that passed; then, with probability at least 1 - epsilon over the calibration data,
the chosen thresholds' risk is at most delta. Assumption (stated in every report): tokens are
exchangeable draws from the deployment distribution, treated as independent (tokens of one
sequence are not, so the guarantee is approximate in that respect). If no candidate passes, no
token exits (all thresholds +inf): the routed pass is then the full cascade, its risk is exactly 0,
and that is the bound reported (``bound = "exact"``), with the most cautious candidate's own
Clopper-Pearson bound beside it (``first_candidate_bound``) to say how far the grid was from passing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from ..data.batch import unpack_batch
from ..measure.distributed import concatenated
from ..stages.ensemble import Ensemble, evaluation_mode
from .calibration import calibrate_sweep
from .passes import forward_cascade
from .policy_names import RISKS
from .stage_reuse import RuleReuse, reuse_for

#: Hard ratios tested, most cautious first (the default sweep's ratios).
RISK_GRID = tuple(round(1 - 0.1 * i, 1) for i in range(1, 10))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (exact up to float rounding)."""
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    if k < 0:
        return 0.0
    if k >= n or p == 0.0:
        return 1.0
    if p == 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = torch.tensor(
        [
            math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
            for i in range(k + 1)
        ],
        dtype=torch.float64,
    )
    return min(1.0, float(torch.logsumexp(terms, dim=0).exp()))


def binomial_upper_bound(k: int, n: int, epsilon: float) -> float:
    """Clopper-Pearson one-sided upper confidence bound at level 1 - epsilon: the largest p with
    P(Binomial(n, p) <= k) >= epsilon (bisection)."""
    if k >= n:
        return 1.0
    low, high = k / n, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if binomial_cdf(k, n, middle) >= epsilon else (low, middle)
    return high


def fixed_sequence_test(
    violations: Sequence[int], tokens: int, delta: float, epsilon: float
) -> tuple[int, list[float]]:
    """Candidates ordered most cautious first, with ``violations[j]`` of ``tokens`` each: the index
    of the last candidate in the run of rejections of "risk > delta" at level epsilon (-1 if the
    first is not rejected), and every p-value computed on the way."""
    _check_level("delta", delta)
    _check_level("epsilon", epsilon)
    if tokens < 1:
        raise ValueError(f"risk control needs at least one scored token on the testing half, got {tokens}")
    chosen, p_values = -1, []
    for j, k in enumerate(violations):
        p_values.append(binomial_cdf(int(k), tokens, delta))
        if p_values[-1] > epsilon:
            break
        chosen = j
    return chosen, p_values


def _check_level(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")


@dataclass(frozen=True)
class RiskControlResult:
    """What risk-controlled calibration chose and why.

    hard_ratio: the grid point chosen (None: no candidate passed, nobody exits). thresholds: per
    non-last stage. tokens: scored tokens on the testing half; violations / empirical_risk: the chosen
    point's there. upper_bound: the bound that holds for the thresholds returned: the chosen point's
    (1 - epsilon) Clopper-Pearson bound (``bound = "clopper-pearson"``), or 0 when none passed and
    nobody exits (``bound = "exact"``). first_candidate_bound: the most cautious candidate's
    Clopper-Pearson bound. p_values: per candidate tested.
    """

    risk: str
    delta: float
    epsilon: float
    nll_tolerance: float
    hard_ratio: Optional[float]
    thresholds: tuple[float, ...]
    tokens: int
    violations: int
    empirical_risk: float
    upper_bound: float
    candidates: tuple[float, ...]
    p_values: tuple[float, ...]
    bound: str = "clopper-pearson"
    first_candidate_bound: float = math.nan

    def summary(self) -> dict:
        return {
            "risk": self.risk,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "nll_tolerance": self.nll_tolerance,
            "hard_ratio": self.hard_ratio,
            "thresholds": list(self.thresholds),
            "tokens": self.tokens,
            "violations": self.violations,
            "empirical_risk": self.empirical_risk,
            "upper_bound": self.upper_bound,
            "bound": self.bound,
            "first_candidate_bound": self.first_candidate_bound,
            "candidates": list(self.candidates),
            "p_values": list(self.p_values),
        }


class FullReference:
    """The full cascade's (last-stage prediction, NLL) per batch, computed the first time a batch is
    compared and kept: every candidate of risk control is compared with the same full pass, which
    runs once per batch (``routed_violations(reference=...)``). Batches are known by their position."""

    def __init__(self, ensemble: Ensemble):
        self.ensemble, self.per_batch = ensemble, {}

    def __call__(self, index: int, item, reuse: Optional[RuleReuse] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self.per_batch:
            ids, mask, targets = unpack_batch(item)
            full = forward_cascade(self.ensemble, ids, mask, targets, method="full", reuse=reuse_for(reuse, index))
            self.per_batch[index] = (full.stage_prediction[len(self.ensemble) - 1], full.nll)
        return self.per_batch[index]


def routed_violations(
    ensemble: Ensemble,
    batches: Iterable,
    thresholds: Sequence[float],
    risk: str = "disagreement",
    nll_tolerance: float = 0.0,
    reference: Optional[FullReference] = None,
    reuse: Optional[RuleReuse] = None,
    **forward_kwargs,
) -> tuple[int, int]:
    """(violations, scored tokens) of the routed pass with ``thresholds`` against the full cascade
    (``reference``: a ``FullReference`` shared by calls on the same batches, else a fresh one;
    ``reuse``: ``stage_reuse`` kept for ``batches`` under the rule in place)."""
    violations, tokens = violations_per_window(
        ensemble, batches, thresholds, risk, nll_tolerance, reference, reuse, **forward_kwargs
    )
    return int(violations.sum()), int(tokens.sum())


def violations_per_window(
    ensemble: Ensemble,
    batches: Iterable,
    thresholds: Sequence[float],
    risk: str = "disagreement",
    nll_tolerance: float = 0.0,
    reference: Optional[FullReference] = None,
    reuse: Optional[RuleReuse] = None,
    **forward_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``routed_violations`` per evaluation window (a row of a batch): (violations, scored tokens),
    two int64 tensors of one entry per window of every batch (all ranks'), windows without a
    scored token left out."""
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}, got {risk!r}")
    reference = FullReference(ensemble) if reference is None else reference

    def per_batch(indexed) -> tuple[torch.Tensor, torch.Tensor]:
        index, item = indexed
        full_prediction, full_nll = reference(index, item, reuse)
        ids, mask, targets = unpack_batch(item)
        routed = forward_cascade(
            ensemble,
            ids,
            mask,
            targets,
            method="routed",
            thresholds=thresholds,
            reuse=reuse_for(reuse, index),
            **forward_kwargs,
        )
        scored = routed.scored
        if risk == "disagreement":
            exit_prediction = routed.stage_prediction.gather(0, routed.exit_stage.clamp(min=0)[None])[0]
            bad = exit_prediction != full_prediction
        else:
            bad = routed.nll > full_nll + nll_tolerance
        return (bad & scored).sum(dim=1).cpu(), scored.sum(dim=1).cpu()

    with evaluation_mode(ensemble), torch.inference_mode():
        violations, tokens = concatenated(per_batch, list(enumerate(batches)), "routed_violations")
    return violations[tokens > 0], tokens[tokens > 0]


def _checked_arguments(batches: list, delta, epsilon, risk: str, nll_tolerance, grid: Sequence[float]) -> tuple:
    """The grid of hard ratios as floats, after every argument of ``risk_controlled_thresholds`` is
    checked (ValueError naming the bad one)."""
    if len(batches) < 2:
        raise ValueError(
            f"risk control needs at least 2 calibration batches (one half proposes thresholds, "
            f"the other tests them), got {len(batches)}"
        )
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}, got {risk!r}")
    if isinstance(nll_tolerance, bool) or not isinstance(nll_tolerance, (int, float)) or nll_tolerance < 0:
        raise ValueError(f"nll_tolerance must be a number >= 0 (nats), got {nll_tolerance!r}")
    _check_level("delta", delta)
    _check_level("epsilon", epsilon)
    grid = tuple(float(r) for r in grid)
    if list(grid) != sorted(grid, reverse=True):
        raise ValueError(f"the grid of hard ratios must go from the most cautious (largest) down, got {list(grid)}")
    return grid


def risk_controlled_thresholds(
    ensemble: Ensemble,
    batches: Sequence,
    delta: float = 0.1,
    epsilon: float = 0.1,
    risk: str = "disagreement",
    nll_tolerance: float = 0.0,
    grid: Sequence[float] = RISK_GRID,
    reuse: Optional[RuleReuse] = None,
    **forward_kwargs,
) -> RiskControlResult:
    """Choose thresholds so that, with probability >= 1 - epsilon, the routed pass's ``risk`` is at
    most ``delta`` (see the module doc); set them on the ensemble and return the record.
    ``batches``: the calibration split, at least 2 batches (even ones calibrate, odd ones test);
    ``reuse``: ``stage_reuse`` kept for ``batches`` under the rule in place (its halves kept apart)."""
    batches = list(batches)
    grid = _checked_arguments(batches, delta, epsilon, risk, nll_tolerance, grid)
    proposing, testing = batches[0::2], batches[1::2]
    original = ensemble.thresholds
    candidates, counts, tokens = [], [], 0
    proposing_reuse, testing_reuse = (
        (None, None) if reuse is None else (reuse.within("proposing"), reuse.within("testing"))
    )
    proposed = calibrate_sweep(ensemble, proposing, grid, proposing_reuse)  # one stage-0 pass for every candidate
    reference = FullReference(ensemble)  # the full cascade on the testing half, once per batch
    try:
        for ratio in grid:
            thresholds = proposed[ratio]
            violations, tokens = routed_violations(
                ensemble,
                testing,
                thresholds,
                risk,
                nll_tolerance,
                reference=reference,
                reuse=testing_reuse,
                **forward_kwargs,
            )
            candidates.append(thresholds)
            counts.append(violations)
            if binomial_cdf(violations, tokens, delta) > epsilon:
                break  # fixed-sequence testing stops at the first candidate it cannot certify
    finally:
        ensemble.set_thresholds(original)
    chosen, p_values = fixed_sequence_test(counts, tokens, delta, epsilon)
    first_bound = binomial_upper_bound(counts[0], tokens, epsilon)
    if chosen < 0:  # nobody exits: the routed pass is the full cascade, whose risk is 0 by definition
        thresholds, ratio, violations = (math.inf,) * (len(ensemble) - 1), None, 0
        bound, upper = "exact", 0.0
    else:
        thresholds, ratio, violations = tuple(candidates[chosen]), grid[chosen], counts[chosen]
        bound, upper = "clopper-pearson", binomial_upper_bound(violations, tokens, epsilon)
    ensemble.set_thresholds(list(thresholds))
    return RiskControlResult(
        risk=risk,
        delta=float(delta),
        epsilon=float(epsilon),
        nll_tolerance=float(nll_tolerance),
        hard_ratio=ratio,
        thresholds=tuple(thresholds),
        tokens=tokens,
        violations=violations,
        empirical_risk=violations / tokens,
        upper_bound=upper,
        candidates=grid[: len(counts)],
        p_values=tuple(p_values),
        bound=bound,
        first_candidate_bound=first_bound,
    )
