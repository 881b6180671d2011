"""The sweep as data: one typed ``Point`` per measurement of a run, planned from its config.

A point is pure data: what it measures (method, exit rule, hard ratio, prefix depth, K/V policy,
batching) and how (whether its FLOPs are counted with FlopCounterMode, whether it is timed);
``point_measures.METHODS`` says how each method is measured, and ``Sweep`` measures it. ``plan_points``
lists a run's points in the order they are measured and stored: the baselines (full, each stage prefix,
the dense model), routed and masked early exit at every swept hard ratio, routed early exit under
every other exit rule, one risk-controlled point per rule, one point per K/V policy at the anchor
ratio, the oracle bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from .records import Method

if TYPE_CHECKING:
    from .config import ExperimentConfig


@dataclass(frozen=True)
class Point:
    """One measurement of the sweep. ``exit_rule``: the rule in place while it is measured;
    ``hard_ratio``: the swept ratio (None for baselines, risk control, which chooses its own, and
    the oracle); ``stages``: a prefix's stage count; ``batching``: the routed pass's layout."""

    id: str
    method: Method
    exit_rule: str
    hard_ratio: Optional[float] = None
    stages: Optional[int] = None
    kv_policy: Optional[str] = None
    batching: Optional[str] = None
    count_flops: bool = True
    timed: bool = True

    def __post_init__(self):
        object.__setattr__(self, "method", Method.of(self.method))


def ratio_label(ratio: float) -> str:
    """A hard ratio as it appears in point ids: short (``0.5``) where that reads back as the same
    number, else every digit (``0.30000000000000004``), so two distinct ratios never share an id."""
    short = f"{ratio:g}"
    return short if float(short) == float(ratio) else repr(float(ratio))


def anchor_ratio(config: "ExperimentConfig") -> float:
    """The swept hard ratio nearest 0.5: its routed and masked points are always counted and timed."""
    return min(config.hard_ratios, key=lambda r: (abs(r - 0.5), r))


def plan_points(
    config: "ExperimentConfig", num_stages: int, dense: bool = True, kv_policies: bool = True
) -> list[Point]:
    """Every point of a run, in the order it measures and stores them. ``dense``: whether a dense
    baseline exists (not for blocks of a pretrained model, whose full point is the unsplit model);
    ``kv_policies``: whether the cascade's layers admit K/V policies."""
    anchor, main = anchor_ratio(config), config.exit_rule

    def counted(ratio: float) -> bool:
        return config.count_flops == "all" or ratio == anchor

    def timed(ratio: float) -> bool:
        return config.timing_points == "all" or ratio == anchor

    def routed(spec: str, ratio: float) -> Point:
        label = f"routed@{ratio_label(ratio)}" if spec == main else f"routed[{spec}]@{ratio_label(ratio)}"
        swept = dict(hard_ratio=ratio, count_flops=counted(ratio), timed=timed(ratio))
        return Point(label, Method.ROUTED, spec, batching=config.batching, **swept)

    points = []
    if "full" in config.baselines:
        points.append(Point("full", Method.FULL, main))
    if "prefix" in config.baselines:
        points += [Point(f"prefix-{k}", Method.PREFIX, main, stages=k + 1) for k in range(num_stages - 1)]
    if "dense" in config.baselines and dense:
        points.append(Point("dense", Method.DENSE, main))
    for ratio in config.hard_ratios:
        points.append(routed(main, ratio))
        if "masked" in config.baselines:
            swept = dict(hard_ratio=ratio, count_flops=counted(ratio), timed=timed(ratio))
            points.append(Point(f"masked@{ratio_label(ratio)}", Method.MASKED, main, **swept))
    points += [routed(spec, ratio) for spec in config.exit_rules if spec != main for ratio in config.hard_ratios]
    if config.risk:
        risk = dict(batching=config.batching, count_flops=False, timed=config.timing_points == "all")
        points += [
            Point(f"risk[{spec}]", Method.RISK_CONTROLLED, spec, **risk)
            for spec in dict.fromkeys((main, *config.exit_rules))
        ]
    if kv_policies:
        points += [
            Point(
                f"kv[{policy}]@{ratio_label(anchor)}",
                Method.KV_ROUTED,
                main,
                hard_ratio=anchor,
                kv_policy=policy,
                batching="padded",
            )
            for policy in config.kv_policies
        ]
    if "oracle" in config.baselines:
        points.append(Point("oracle", Method.ORACLE, main, count_flops=False, timed=False))
    return points
