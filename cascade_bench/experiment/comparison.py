"""Several runs of ``cascade-bench run`` on the same data, compared at matched FLOPs.

Each run contributes its routed early-exit curve (PPL against FLOPs per token over the swept hard
ratios), its full-depth point and its stage 0 alone; the dense model of the same depth comes from
the first run that has one. FLOPs per token are the analytic count (equal to the counted one
wherever both were measured, as each run's checks state) over the tokens entering stage 0, so runs
with the same preset and test split share one axis. Budgets are fractions of the dense model's
FLOPs per token; a curve is interpolated linearly between its measured points and never
extrapolated ("n/a" where it does not reach a budget).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import pandas as pd

from .checks import is_main_rule, main_routed, main_rule, point_of
from .records import Method, Record

#: Default budgets, as fractions of the dense model's FLOPs per token.
BUDGETS = (0.7, 0.8, 0.9, 1.0)


def flops_per_token(record: Record) -> float:
    return float(record.flops_analytic) / float(record.tokens_entered[0])


def _routed(records: Sequence[Record], rule: Optional[str]) -> list[Record]:
    """The run's routed sweep under ``rule`` (None: the run's own exit rule)."""
    if rule is None:
        return main_routed(records)
    return [
        r
        for r in records
        if r.method == Method.ROUTED
        and is_main_rule(r, rule)
        and (r.exit_rule is not None or main_rule(records) == rule)
    ]


def ppl_at(curve: Sequence[tuple[float, float]], budget: float) -> float:
    """PPL of a (FLOPs per token, PPL) curve at ``budget``: the best PPL of the curve's segments that
    span the budget, linearly interpolated; NaN outside the measured range."""
    best = math.nan
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= budget <= x1:
            y = y0 if x1 == x0 else y0 + (y1 - y0) * (budget - x0) / (x1 - x0)
            best = y if math.isnan(best) else min(best, y)
    if len(curve) == 1 and curve[0][0] == budget:
        best = curve[0][1]
    return best


def _protocol_name(records: Sequence[Record], fallback: str) -> str:
    for record in records:
        training = (record.conditions or {}).get("training") or {}
        if training.get("protocol"):
            return training["protocol"]
    return fallback


def comparison_table(
    runs: dict[str, Sequence[Record]], budgets: Sequence[float] = BUDGETS, rule: Optional[str] = None
) -> pd.DataFrame:
    """One row per run (its protocol's routed early exit) plus the dense model; columns: stage 0 alone,
    full depth, the exit rule, routed at hard ratio 0.5, and PPL at each budget (fraction of the dense
    FLOPs/token). ``rule``: the exit rule whose sweep every run contributes (None: each run's own, which
    the ``exit rule`` column names)."""
    if not runs:
        raise ValueError("compare needs at least one run")
    dense = next((r for records in runs.values() for r in records if r.method == Method.DENSE), None)
    if dense is None:
        raise ValueError(f"none of the runs {sorted(runs)} has a dense point to set the FLOP budgets")
    reference = flops_per_token(dense)
    test_tokens = {name: next(r.tokens for r in records if r.method == Method.FULL) for name, records in runs.items()}
    if len(set(test_tokens.values()) | {dense.tokens}) != 1:
        raise ValueError(
            f"runs were scored on different test tokens ({test_tokens}, dense {dense.tokens}); "
            f"compare runs of the same data and windows only"
        )
    rows = []
    for name, records in runs.items():
        routed, full = _routed(records, rule), point_of(records, Method.FULL)
        if not routed or full is None:
            raise ValueError(
                f"run {name!r} has no routed sweep{f' of exit rule {rule!r}' if rule else ''} or no "
                f"full point to compare"
            )
        half = min(routed, key=lambda r: (abs(r.hard_ratio - 0.5), r.hard_ratio))
        curve = sorted((flops_per_token(r), r.ppl) for r in routed)
        prefix = point_of(records, Method.PREFIX, stages=1)
        row = {
            "method": f"{_protocol_name(records, name)} ({name})",
            "stage 0 alone PPL": prefix.ppl if prefix else math.nan,
            "full depth PPL": full.ppl,
            "full depth FLOPs ratio": flops_per_token(full) / reference,
            "exit rule": rule or main_rule(records),
            f"routed @ hard {half.hard_ratio:g} PPL": half.ppl,
            f"routed @ hard {half.hard_ratio:g} FLOPs ratio": flops_per_token(half) / reference,
        }
        row.update({f"PPL @ {b:g}x FLOPs": ppl_at(curve, b * reference) for b in budgets})
        rows.append(row)
    dense_row = {
        "method": "dense, same depth",
        "stage 0 alone PPL": math.nan,
        "full depth PPL": dense.ppl,
        "full depth FLOPs ratio": 1.0,
        "exit rule": "no exit",
    }
    dense_row.update({f"PPL @ {b:g}x FLOPs": dense.ppl if b == 1.0 else math.nan for b in budgets})
    rows.append(dense_row)
    return pd.DataFrame(rows)


def seed_comparison_table(runs: dict[str, Sequence[Record]]) -> pd.DataFrame:
    """The ASHEM report's layout (``reports.seed_table``) for each run side by side, with the seed's
    published figures in the first column."""
    from .config import make_config
    from .frames import records_frame
    from .reports import ASHEM_SEED_FIGURES, seed_table

    if not runs:
        raise ValueError("compare needs at least one run")
    table = None
    for name, records in runs.items():
        stored = dict((records[0].conditions or {}).get("config") or {})
        if not stored:
            raise ValueError(f"run {name!r} stores no config in its records; rerun it with this version")
        ours, _ = seed_table(records_frame(records), make_config(stored))
        if table is None:
            table = ours[["quantity"]].copy()
            table["ASHEM seed (published)"] = [ASHEM_SEED_FIGURES.get(k, math.nan) for k in table.quantity]
        table[name] = ours["this run"].values
    return table


__all__ = ["BUDGETS", "comparison_table", "flops_per_token", "ppl_at", "seed_comparison_table"]
