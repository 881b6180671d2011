"""Confidence intervals: seeded bootstrap (``scipy.stats.bootstrap``) over the units a figure sums.

Quality figures are ratios of sums over evaluation windows (PPL = exp(sum NLL / sum tokens),
accuracy = sum correct / sum tokens, hard/easy PPL over the hard/easy tokens of each window), so
the unit resampled is the window: a resample draws windows with replacement and recomputes the
ratio of their sums, which keeps the tokens of one window together (they are not independent).
A difference between two methods is *paired*: both are scored on the same windows, and each
resample draws the same windows for both (``paired=True``), which is what removes the variation
between windows that the two share. Intervals are BCa (bias-corrected and accelerated) unless
named otherwise; wall-time medians use the percentile interval (a median of few repeats has a
jackknife too coarse for BCa's acceleration; with n repeats it is close to their range, whose
coverage of the true median is 1 - 2^(1-n), 75% for 3: ``median_coverage``).

Pure functions: numbers in, numbers out; ``IntervalSettings`` fixes the resamples, level and seed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

#: Per-window sums every pass records (``routing.evaluation``), in this order.
WINDOW_FIELDS = ("tokens", "nll", "correct", "hard_tokens", "hard_nll", "easy_nll")


@dataclass(frozen=True)
class IntervalSettings:
    """How every interval is made: ``resamples`` bootstrap resamples, two-sided ``level``, ``seed``."""

    resamples: int = 2000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.resamples, bool) or not isinstance(self.resamples, int) or self.resamples < 100:
            raise ValueError(f"resamples must be an int >= 100, got {self.resamples!r}")
        if isinstance(self.level, bool) or not isinstance(self.level, (int, float)) or not 0.5 <= self.level < 1:
            raise ValueError(f"level must be a number in [0.5, 1), got {self.level!r}")

    def describe(self, unit: str, count: int, method: str = "BCa") -> dict:
        """What a record says about its intervals."""
        return {
            "unit": unit,
            "units": count,
            "resamples": self.resamples,
            "level": self.level,
            "method": method,
            "seed": self.seed,
        }


def _bootstrap(samples: Sequence[np.ndarray], statistic: Callable, settings: IntervalSettings, method: str) -> list:
    """[low, high] of ``statistic`` over paired resamples of ``samples`` (equally long arrays); [v, v]
    where every resample must give the same value (no variation to resample), NaN ends where the
    statistic is undefined on the data itself."""
    from scipy.stats import bootstrap

    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    value = float(statistic(*arrays, axis=-1))
    if not math.isfinite(value) or len(arrays[0]) < 2:
        return [math.nan, math.nan]
    if all(np.all(a == a[0]) for a in arrays) or _constant(arrays, statistic):
        return [value, value]
    with warnings.catch_warnings():
        # a resample whose hard tokens happen to be none gives NaN: scipy warns, the interval says NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        result = bootstrap(
            arrays,
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=settings.resamples,
            confidence_level=settings.level,
            method=method,
            batch=_BLOCK,  # resamples (and BCa's leave-one-out values) computed a block at a time
            rng=np.random.default_rng(settings.seed),
        )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return [low, high]


#: Units per block when the leave-one-out values are computed (memory: block x units per array).
_BLOCK = 256


def _constant(arrays: list, statistic: Callable) -> bool:
    """Whether leaving out any one unit leaves the statistic unchanged (a difference between two
    identical methods, for one): BCa's acceleration is then undefined, and the interval is the value.
    Computed ``_BLOCK`` units at a time, so memory grows with the units, not their square."""
    n = len(arrays[0])
    first = None
    for start in range(0, n, _BLOCK):
        rows = np.arange(start, min(n, start + _BLOCK))
        keep = np.ones((len(rows), n), dtype=bool)
        keep[np.arange(len(rows)), rows] = False
        jack = statistic(*(np.broadcast_to(a, keep.shape)[keep].reshape(len(rows), n - 1) for a in arrays), axis=-1)
        first = jack[0] if first is None else first
        if not np.all(jack == first):
            return False
    return True


def _ratio(exp: bool) -> Callable:
    def statistic(numerator, denominator, axis=-1):
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.sum(numerator, axis=axis) / np.sum(denominator, axis=axis)
        return np.exp(mean) if exp else mean

    return statistic


def ratio_interval(
    numerator: Sequence[float], denominator: Sequence[float], settings: IntervalSettings, exp: bool = False
) -> list:
    """Interval of sum(numerator) / sum(denominator) (of its exp with ``exp``: a PPL) over units."""
    return _bootstrap([numerator, denominator], _ratio(exp), settings, "BCa")


def paired_difference_interval(
    numerator: Sequence[float],
    reference_numerator: Sequence[float],
    denominator: Sequence[float],
    reference_denominator: Sequence[float],
    settings: IntervalSettings,
    exp: bool = False,
) -> tuple[float, list]:
    """(value, interval) of ratio(numerator, denominator) - ratio(reference's), both over the same
    units resampled together."""
    ratio = _ratio(exp)

    def statistic(a, b, c, d, axis=-1):
        return ratio(a, c, axis) - ratio(b, d, axis)

    samples = [numerator, reference_numerator, denominator, reference_denominator]
    value = float(statistic(*(np.asarray(s, dtype=np.float64) for s in samples)))
    return value, _bootstrap(samples, statistic, settings, "BCa")


def median_interval(samples: Sequence[float], settings: IntervalSettings) -> list:
    """Percentile interval of the median of ``samples`` (wall-time ratios of repeated pairs)."""
    finite = [s for s in samples if math.isfinite(s)]
    if len(finite) < 2:
        return [math.nan, math.nan]

    def statistic(x, axis=-1):
        return np.median(x, axis=axis)

    return _bootstrap([finite], statistic, settings, "percentile")


def median_coverage(samples: int) -> float:
    """Probability that the range of ``samples`` independent draws covers their distribution's median:
    what the percentile interval of a median of few samples really covers (it tends to their range)."""
    return 1.0 - 2.0 ** (1 - samples) if samples >= 2 else 0.0


def contains_zero(interval: Optional[Sequence[float]]) -> bool:
    """Whether a difference's interval includes 0 (the two are not distinguishable at its level)."""
    if interval is None or any(not math.isfinite(v) for v in interval):
        return True
    return interval[0] <= 0.0 <= interval[1]


def _column(windows: Sequence[Sequence[float]], name: str) -> np.ndarray:
    return np.asarray([w[WINDOW_FIELDS.index(name)] for w in windows], dtype=np.float64)


def quality_intervals(
    windows: Sequence[Sequence[float]], reference: Sequence[Sequence[float]], settings: IntervalSettings
) -> dict:
    """Intervals of a pass's PPL, accuracy, hard and easy PPL over its evaluation windows (rows of
    ``WINDOW_FIELDS`` sums), and of its PPL and accuracy differences from ``reference`` (the full-depth
    pass over the same windows, resampled with them): ``{"ppl": [lo, hi], ..., "difference_from_full":
    {"ppl": {"value": d, "interval": [lo, hi]}, "accuracy": {...}}}``, with how they were made."""
    if len(windows) != len(reference):
        raise ValueError(f"paired intervals need the same windows: {len(windows)} windows vs {len(reference)}")
    tokens, reference_tokens = _column(windows, "tokens"), _column(reference, "tokens")
    if not np.array_equal(tokens, reference_tokens):
        raise ValueError("paired intervals need the same windows: the scored tokens per window differ")
    nll, correct = _column(windows, "nll"), _column(windows, "correct")
    hard = _column(windows, "hard_tokens")
    differences = {name: paired_difference(windows, reference, settings, name) for name in ("ppl", "accuracy")}
    return {
        **settings.describe("window", len(windows)),
        "ppl": ratio_interval(nll, tokens, settings, exp=True),
        "accuracy": ratio_interval(correct, tokens, settings),
        "hard_ppl": ratio_interval(_column(windows, "hard_nll"), hard, settings, exp=True),
        "easy_ppl": ratio_interval(_column(windows, "easy_nll"), tokens - hard, settings, exp=True),
        "difference_from_full": differences,
    }


def paired_difference(
    windows: Sequence[Sequence[float]], reference: Sequence[Sequence[float]], settings: IntervalSettings, name: str
) -> dict:
    """``{"value": d, "interval": [lo, hi]}``: a pass's PPL ("ppl") or accuracy ("accuracy") minus the
    reference pass's over the same windows (rows of ``WINDOW_FIELDS`` sums), resampled together."""
    tokens = _column(windows, "tokens")
    if len(windows) != len(reference) or not np.array_equal(tokens, _column(reference, "tokens")):
        raise ValueError("paired intervals need the same windows: the scored tokens per window differ")
    field = {"ppl": "nll", "accuracy": "correct"}[name]
    mine, theirs = _column(windows, field), _column(reference, field)
    value, interval = paired_difference_interval(mine, theirs, tokens, tokens, settings, exp=name == "ppl")
    return {"value": value, "interval": interval}
