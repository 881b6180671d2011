"""The sweep as data: one typed ``Point`` per measurement of a run, planned from its config.

A point says what it measures (method, exit rule, hard ratio, prefix depth, K/V policy, batching)
and how (whether its FLOPs are counted with FlopCounterMode, whether it is timed); ``measure``
turns it into a ``Record`` with a ``Sweep``'s cascade, batches, thresholds and rules, and
``calls`` reruns its pass batch by batch for the back-to-back wall ratio. ``plan_points`` lists a
run's points in the order they are measured and stored: the baselines (full, each stage prefix,
the dense model), routed and masked early exit at every swept hard ratio, routed early exit under
every other exit rule, one risk-controlled point per rule, one point per K/V policy at the anchor
ratio, the oracle bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from ..measure.environment import environment_conditions
from ..routing.oracle import oracle_bound
from ..routing.passes import forward_cascade
from ..routing.risk_control import risk_controlled_thresholds, routed_violations
from .records import Record

if TYPE_CHECKING:
    from .config import ExperimentConfig
    from .sweep import Sweep


@dataclass(frozen=True)
class Point:
    """One measurement of the sweep. ``exit_rule``: the rule in place while it is measured;
    ``hard_ratio``: the swept ratio (None for baselines, risk control, which chooses its own, and
    the oracle); ``stages``: a prefix's stage count; ``batching``: the routed pass's layout."""

    id: str
    method: str
    exit_rule: str
    hard_ratio: Optional[float] = None
    stages: Optional[int] = None
    kv_policy: Optional[str] = None
    batching: Optional[str] = None
    count_flops: bool = True
    timed: bool = True

    def measure(self, sweep: "Sweep") -> Record:
        """The point's record, measured on ``sweep`` (with this point's exit rule in place)."""
        return _MEASURES[self.method](self, sweep)

    def calls(self, sweep: "Sweep", batches: Sequence, record: Record) -> Optional[list[Callable[[], object]]]:
        """One call per batch that reruns the pass ``record`` measured (at its thresholds), for the
        back-to-back ratio; None for the oracle, which runs no pass."""
        if self.method == "oracle":
            return None
        model = sweep.dense_model()[0] if self.method == "dense" else sweep.cascade
        kwargs: dict = {"method": "full"}
        if self.method == "prefix":
            kwargs["num_stages"] = self.stages
        elif self.method in ("routed", "risk_controlled", "kv_routed"):
            kwargs = {"method": "routed", "thresholds": record.thresholds, "batching": self.batching}
            if self.kv_policy is not None:
                kwargs["kv_policy"] = self.kv_policy
        elif self.method == "masked":
            kwargs = {"method": "masked", "thresholds": record.thresholds}
        return [
            lambda batch=batch: forward_cascade(
                model, batch["input_ids"], batch.get("attention_mask"), batch.get("targets"), **kwargs
            )
            for batch in batches
        ]


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
    anchor, main = anchor_ratio(config), config.exit_fn

    def counted(ratio: float) -> bool:
        return config.count_flops == "all" or ratio == anchor

    def timed(ratio: float) -> bool:
        return config.timing_points == "all" or ratio == anchor

    def routed(spec: str, ratio: float) -> Point:
        label = f"routed@{ratio_label(ratio)}" if spec == main else f"routed[{spec}]@{ratio_label(ratio)}"
        swept = dict(hard_ratio=ratio, count_flops=counted(ratio), timed=timed(ratio))
        return Point(label, "routed", spec, batching=config.batching, **swept)

    points = []
    if "full" in config.baselines:
        points.append(Point("full", "full", main))
    if "prefix" in config.baselines:
        points += [Point(f"prefix-{k}", "prefix", main, stages=k + 1) for k in range(num_stages - 1)]
    if "dense" in config.baselines and dense:
        points.append(Point("dense", "dense", main))
    for ratio in config.hard_ratios:
        points.append(routed(main, ratio))
        if "masked" in config.baselines:
            swept = dict(hard_ratio=ratio, count_flops=counted(ratio), timed=timed(ratio))
            points.append(Point(f"masked@{ratio_label(ratio)}", "masked", main, **swept))
    points += [routed(spec, ratio) for spec in config.exit_rules if spec != main for ratio in config.hard_ratios]
    if config.risk:
        risk = dict(batching=config.batching, count_flops=False, timed=config.timing_points == "all")
        points += [
            Point(f"risk[{spec}]", "risk_controlled", spec, **risk)
            for spec in dict.fromkeys((main, *config.exit_rules))
        ]
    if kv_policies:
        points += [
            Point(
                f"kv[{policy}]@{ratio_label(anchor)}",
                "kv_routed",
                main,
                hard_ratio=anchor,
                kv_policy=policy,
                batching="padded",
            )
            for policy in config.kv_policies
        ]
    if "oracle" in config.baselines:
        points.append(Point("oracle", "oracle", main, count_flops=False, timed=False))
    return points


def _measure_baseline(point: Point, sweep: "Sweep") -> Record:
    if point.method == "dense":
        dense, summary = sweep.dense_model()
        record = Record.of_cost(point.id, "dense", sweep.cost(dense, "full"))
        record.conditions = {**record.conditions, "dense_training": summary}
        return record
    if point.method == "prefix":
        cost = sweep.cost(sweep.cascade, "full", num_stages=point.stages)
        return Record.of_cost(point.id, "prefix", cost, stages=point.stages)
    return Record.of_cost(point.id, "full", sweep.cost(sweep.cascade, "full"))


def _measure_swept(point: Point, sweep: "Sweep") -> Record:
    """Routed or masked early exit at a swept hard ratio, under the point's exit rule."""
    thresholds = sweep.thresholds_at(point.hard_ratio, point.exit_rule)
    swept = dict(thresholds=thresholds, count_flops=point.count_flops, timed=point.timed)
    if point.method == "masked":
        cost = sweep.cost(sweep.cascade, "masked", **swept)
        return Record.of_cost(point.id, "masked", cost, hard_ratio=point.hard_ratio, exit_rule=point.exit_rule)
    cost = sweep.cost(sweep.cascade, "routed", batching=point.batching, **swept)
    extra: dict = {"exit_rule": point.exit_rule}
    built = sweep.built_rules.get(point.exit_rule)
    if built is not None:
        extra["rule_training"] = built.training
        if built.approximates_max_prob:
            extra["agreement_with_max_prob"] = sweep.agreement_with_max_prob(point.hard_ratio, point.exit_rule)
    return Record.of_cost(point.id, "routed", cost, hard_ratio=point.hard_ratio, **extra)


def _measure_risk_controlled(point: Point, sweep: "Sweep") -> Record:
    config = sweep.config
    result = risk_controlled_thresholds(
        sweep.cascade,
        sweep.risk_calibration or sweep.validation,
        config.risk_delta,
        config.risk_epsilon,
        config.risk,
        config.risk_nll_tolerance,
        batching=point.batching,
    )
    cost = sweep.cost(
        sweep.cascade,
        "routed",
        thresholds=list(result.thresholds),
        batching=point.batching,
        count_flops=point.count_flops,
        timed=point.timed,
    )
    violations, tokens = routed_violations(
        sweep.cascade, sweep.test, result.thresholds, config.risk, config.risk_nll_tolerance, batching=point.batching
    )
    built = sweep.built_rules.get(point.exit_rule)
    return Record.of_cost(
        point.id,
        "risk_controlled",
        cost,
        hard_ratio=result.hard_ratio,
        exit_rule=point.exit_rule,
        risk_control={**result.summary(), "calibration": sweep.risk_calibration_note()},
        realised_risk=violations / tokens,
        realised_violations=violations,
        rule_training=built.training if built is not None else None,
    )


def _measure_kv_routed(point: Point, sweep: "Sweep") -> Record:
    cost = sweep.cost(
        sweep.cascade,
        "routed",
        thresholds=sweep.thresholds_at(point.hard_ratio, point.exit_rule),
        batching=point.batching,
        kv_policy=point.kv_policy,
        count_flops=point.count_flops,
        timed=point.timed,
    )
    q = cost.quality
    return Record.of_cost(
        point.id,
        "kv_routed",
        cost,
        hard_ratio=point.hard_ratio,
        exit_rule=point.exit_rule,
        kv_policy=point.kv_policy,
        batching=point.batching,
        tokens_computed=list(q.tokens_computed),
        tokens_propagated=list(q.tokens_propagated),
    )


def _measure_oracle(point: Point, sweep: "Sweep") -> Record:
    result = oracle_bound(sweep.cascade, sweep.test, sweep.config.oracle_tolerance)
    parameter = next(iter(sweep.cascade.parameters()))
    return Record(
        point_id=point.id,
        method="oracle",
        hard_ratio=None,
        ppl=result.ppl,
        accuracy=None,
        exit_ratios=list(result.exit_ratios),
        tokens_entered=list(result.tokens_entered),
        layer_cost=result.layer_cost,
        flops=None,
        flops_analytic=result.flops_analytic,
        time_median_s=None,
        tokens=result.tokens,
        oracle_tolerance=result.tolerance,
        layers_per_stage=list(sweep.cascade.layers_per_stage),
        conditions={
            **sweep.conditions,
            **environment_conditions(parameter.device, parameter.dtype),
            "note": "analytic cost only; per-stage NLL from the no-exit cascade (later stages see full context)",
        },
    )


_MEASURES: dict[str, Callable[[Point, "Sweep"], Record]] = {
    "full": _measure_baseline,
    "prefix": _measure_baseline,
    "dense": _measure_baseline,
    "routed": _measure_swept,
    "masked": _measure_swept,
    "risk_controlled": _measure_risk_controlled,
    "kv_routed": _measure_kv_routed,
    "oracle": _measure_oracle,
}
