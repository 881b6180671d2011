"""A figure with its confidence interval, as the tables carry it, and what a difference's interval says.

Records keep their intervals in ``intervals`` (``measure.intervals.quality_intervals``: bootstrap over
evaluation windows) and the back-to-back wall ratio's in ``wall_ratio_interval``; ``estimate`` reads
one of them off a records-frame row as an ``Estimate``, which the table writers format: Markdown and
CSV with both ends, LaTeX as ``x \\pm h`` or ``x [lo, hi]``. A record written before intervals existed
gives an ``Estimate`` without one (shown as the value alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..measure.intervals import contains_zero, median_coverage

#: What a difference from full depth whose interval excludes 0 says, by sign, for a figure where
#: lower is better (PPL) and where higher is (accuracy).
NOT_DISTINGUISHABLE = "not distinguishable"


@dataclass(frozen=True)
class Estimate:
    """``value`` with its interval [``low``, ``high``] (NaN ends: none); ``signed`` writes a + before
    positive numbers (differences)."""

    value: float
    low: float = math.nan
    high: float = math.nan
    signed: bool = False

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2 if self.has_interval else math.nan


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _interval_of(row, name: str) -> Optional[list]:
    intervals = row.get("intervals")
    if not isinstance(intervals, dict):
        return None
    found = intervals.get(name)
    return found if isinstance(found, list) and len(found) == 2 else None


def estimate(row, name: str) -> Estimate:
    """Field ``name`` of a records-frame row with its stored interval (``intervals[name]``; the wall
    ratio's is ``wall_ratio_interval``)."""
    value = _number(row.get(name))
    interval = row.get("wall_ratio_interval") if name == "wall_ratio" else _interval_of(row, name)
    if not isinstance(interval, list) or len(interval) != 2:
        return Estimate(value)
    return Estimate(value, _number(interval[0]), _number(interval[1]))


def difference(row, name: str) -> Estimate:
    """The row's paired difference from full depth in ``name`` ("ppl" or "accuracy"), with its interval."""
    intervals = row.get("intervals")
    found = intervals.get("difference_from_full", {}).get(name) if isinstance(intervals, dict) else None
    if not isinstance(found, dict):
        return Estimate(math.nan, signed=True)
    low, high = found["interval"]
    return Estimate(_number(found["value"]), _number(low), _number(high), signed=True)


def verdict(change: Estimate, lower_is_better: bool = True) -> str:
    """ "better" / "worse" than full depth where the difference's interval excludes 0, else "not
    distinguishable" ("n/a" without an interval; "same" for a difference that is exactly 0)."""
    if not change.has_interval:
        return "n/a"
    if change.value == change.low == change.high == 0:
        return "same"
    if contains_zero([change.low, change.high]):
        return NOT_DISTINGUISHABLE
    lower = change.high < 0
    return "better" if lower == lower_is_better else "worse"


def interval_note(frame, latex: str = "") -> str:
    """What the tables' intervals are, from a records frame's ``intervals`` (empty when none has one);
    ``latex``: the LaTeX style the note describes ("pm": values as x \\pm h, differences in brackets)."""
    described = next((i for i in frame.get("intervals", []) if isinstance(i, dict) and "level" in i), None)
    if described is None:
        return ""
    pairs = next((len(p) for p in frame.get("wall_ratio_pairs", []) if isinstance(p, list) and p), 0)
    written = (
        "x \\pm h: h is half the interval's width (BCa intervals are not symmetric: the CSV has both ends); "
        "differences and skewed intervals in brackets, "
        if latex == "pm"
        else "[lo, hi]: "
    )
    wall = (
        f"; wall ratio: percentile bootstrap of the median of its {pairs} back-to-back pairs, which with {pairs} "
        f"pairs is about their range and covers the true median with probability {median_coverage(pairs):.0%}, "
        f"not {described['level']:.0%}"
        if pairs
        else ""
    )
    return (
        f"{written}{described['level']:.0%} {described['method']} bootstrap intervals over the "
        f"{described['units']} scored {described['unit']}s ({described['resamples']:,} resamples, seed "
        f"{described['seed']}), paired with full depth for differences (PPL - full){wall}; FLOP ratios and "
        f"layer cost are exact counts"
    )
