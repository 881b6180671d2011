"""A run's records as one pandas frame, the shape every table and plot reads: one row per point, its
stored fields plus costs relative to the full-depth baseline and a label per point."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import pandas as pd

from .checks import main_rule
from .records import Method, Record


def records_frame(records: Sequence[Record]) -> pd.DataFrame:
    """One row per point (its stored fields), with costs relative to the full cascade (layer_cost,
    flop_ratio, wall_ratio)."""
    if not records:
        raise ValueError("no results to report; run `cascade-bench run` first")
    frame = pd.DataFrame([record.as_dict() for record in records])
    full = frame[frame.method == Method.FULL]
    if full.empty:
        raise ValueError("the results have no 'full' point; relative costs need the full-cascade baseline")
    full = full.iloc[0]
    # Layer cost relative to the full cascade's depth (a prefix of 2 of 4 layers costs 0.5).
    full_layers = sum(full.layers_per_stage)
    frame["layer_cost"] = frame.layer_cost * frame.layers_per_stage.map(sum) / full_layers
    frame["exit_ratio_0"] = frame.exit_ratios.map(lambda r: r[0] if isinstance(r, list) and r else math.nan)
    flops = frame.flops.where(frame.flops.notna(), frame.flops_analytic).astype(float)
    frame["flop_ratio"] = flops / float(full.flops)
    # The same ratio over the timed batches alone, which is what a wall ratio compares with (records
    # written before the field existed have none).
    if "flops_analytic_timed" in frame and full.get("flops_analytic_timed") is not None:
        frame["flop_ratio_timed"] = frame.flops_analytic_timed.astype(float) / float(full.flops_analytic_timed)
    else:
        frame["flop_ratio_timed"] = math.nan
    # Wall ratio: the back-to-back ratio each point measured against the full cascade where it
    # has one (drift between points stays out), else the ratio of medians timed apart.
    apart = frame.time_median_s.astype(float) / float(full.time_median_s)
    if "wall_ratio_interleaved" in frame:
        frame["wall_ratio"] = frame.wall_ratio_interleaved.astype(float).where(
            frame.wall_ratio_interleaved.notna(), apart
        )
        frame.loc[frame.method == Method.FULL, "wall_ratio"] = 1.0
    else:
        frame["wall_ratio"] = apart
    rule = main_rule(records)
    if "exit_rule" not in frame:
        frame["exit_rule"] = None
    frame["main"] = frame.exit_rule.isna() | (frame.exit_rule == rule)
    frame["exit_rule"] = frame.exit_rule.where(frame.exit_rule.notna(), rule)
    if "decision_flops" not in frame:
        frame["decision_flops"] = math.nan
    frame["decision_share"] = frame.decision_flops.astype(float) / flops
    frame["label"] = frame.apply(_label, axis=1)
    return frame


def main_routed_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The routed points of the run's own exit rule."""
    return frame[(frame.method == Method.ROUTED) & frame.main]


def _pretrained_model(row) -> Optional[str]:
    """The checkpoint a record's blocks were cut from (None for a trained cascade)."""
    conditions = row.get("conditions")
    training = conditions.get("training") if isinstance(conditions, dict) else None
    return training.get("model") if isinstance(training, dict) else None


def _label(row) -> str:
    blocks = _pretrained_model(row) is not None
    part = "block" if blocks else "stage"
    if row.method == Method.PREFIX:
        stages = int(row.get("stages", 1))
        return f"{part} 0 alone" if stages == 1 else f"{part}s 0..{stages - 1} alone"
    if row.method in (Method.ROUTED, Method.MASKED):
        rule = "" if row.get("main", True) else f" [{row.exit_rule}]"
        return f"{row.method} EE{rule} @ hard {row.hard_ratio:g}"
    if row.method == Method.KV_ROUTED:
        return f"routed EE, K/V {row.kv_policy} (padded) @ hard {row.hard_ratio:g}"
    if row.method == Method.RISK_CONTROLLED:
        return f"risk-controlled [{row.exit_rule}]"
    if row.method == Method.FULL and blocks:
        return "unsplit model"
    return {Method.FULL: "full cascade", Method.DENSE: "dense, same depth", Method.ORACLE: "oracle bound"}.get(
        row.method, row.method
    )
