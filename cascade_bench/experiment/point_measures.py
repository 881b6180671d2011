"""How each method of the sweep is measured: ``METHODS`` maps a ``Method`` to the function that
turns a ``Point`` into its ``Record`` with a ``Sweep``'s cascade, batches, thresholds and rules,
and to the ``forward_cascade`` arguments that rerun the measured pass for the back-to-back wall
ratio (None for the oracle, which runs no pass)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from ..measure.environment import environment_conditions
from ..measure.intervals import ratio_interval
from ..routing.oracle import oracle_bound
from ..routing.risk_control import risk_controlled_thresholds, violations_per_window
from .points import Point
from .records import Method, Record

if TYPE_CHECKING:
    from .sweep import Sweep


def _measure_full(point: Point, sweep: Sweep) -> Record:
    return Record.of_cost(point.id, Method.FULL, sweep.cost(sweep.ensemble, "full"))


def _measure_prefix(point: Point, sweep: Sweep) -> Record:
    cost = sweep.cost(sweep.ensemble, "full", num_stages=point.stages)
    return Record.of_cost(point.id, Method.PREFIX, cost, stages=point.stages)


def _measure_dense(point: Point, sweep: Sweep) -> Record:
    dense, summary = sweep.dense_model()
    record = Record.of_cost(point.id, Method.DENSE, sweep.cost(dense, "full"))
    record.conditions = {**record.conditions, "dense_training": summary}
    return record


def _swept(point: Point, sweep: Sweep) -> dict:
    """The cost settings of a point at a swept hard ratio: its thresholds under its exit rule."""
    thresholds = sweep.thresholds_at(point.hard_ratio, point.exit_rule)
    return dict(thresholds=thresholds, count_flops=point.count_flops, timed=point.timed, reuse=sweep.reuse_for(point))


def _measure_masked(point: Point, sweep: Sweep) -> Record:
    cost = sweep.cost(sweep.ensemble, "masked", **_swept(point, sweep))
    return Record.of_cost(point.id, Method.MASKED, cost, hard_ratio=point.hard_ratio, exit_rule=point.exit_rule)


def _measure_routed(point: Point, sweep: Sweep) -> Record:
    """Routed early exit at a swept hard ratio under the point's exit rule, with that rule's training
    and, for a rule that approximates max_prob, how often its stage-0 decisions agree with it."""
    cost = sweep.cost(sweep.ensemble, "routed", batching=point.batching, **_swept(point, sweep))
    extra: dict = {"exit_rule": point.exit_rule}
    built = sweep.built_rules.get(point.exit_rule)
    if built is not None:
        extra["rule_training"] = built.training
        if built.approximates_max_prob:
            extra["agreement_with_max_prob"] = sweep.agreement_with_max_prob(point.hard_ratio, point.exit_rule)
    return Record.of_cost(point.id, Method.ROUTED, cost, hard_ratio=point.hard_ratio, **extra)


def _measure_risk_controlled(point: Point, sweep: Sweep) -> Record:
    config = sweep.config
    result = risk_controlled_thresholds(
        sweep.ensemble,
        sweep.risk_calibration or sweep.validation,
        config.risk_delta,
        config.risk_epsilon,
        config.risk,
        config.risk_nll_tolerance,
        reuse=sweep.risk_reuse_for(point),
        batching=point.batching,
    )
    cost = sweep.cost(
        sweep.ensemble,
        Method.ROUTED,
        thresholds=list(result.thresholds),
        batching=point.batching,
        count_flops=point.count_flops,
        timed=point.timed,
        reuse=sweep.reuse_for(point),
    )
    per_window, window_tokens = violations_per_window(
        sweep.ensemble,
        sweep.test,
        result.thresholds,
        config.risk,
        config.risk_nll_tolerance,
        reuse=sweep.reuse_for(point),
        batching=point.batching,
    )
    violations, tokens = int(per_window.sum()), int(window_tokens.sum())
    built = sweep.built_rules.get(point.exit_rule)
    return Record.of_cost(
        point.id,
        Method.RISK_CONTROLLED,
        cost,
        hard_ratio=result.hard_ratio,
        exit_rule=point.exit_rule,
        risk_control={**result.summary(), "calibration": sweep.risk_calibration_note()},
        realised_risk=violations / tokens,
        realised_violations=violations,
        rule_training=built.training if built is not None else None,
        intervals={"realised_risk": ratio_interval(per_window, window_tokens, sweep.interval_settings)},
    )


def _measure_kv_routed(point: Point, sweep: Sweep) -> Record:
    cost = sweep.cost(
        sweep.ensemble,
        Method.ROUTED,
        thresholds=sweep.thresholds_at(point.hard_ratio, point.exit_rule),
        batching=point.batching,
        kv_policy=point.kv_policy,
        count_flops=point.count_flops,
        timed=point.timed,
        reuse=sweep.reuse_for(point) if point.kv_policy == "absent" else None,
    )
    q = cost.quality
    return Record.of_cost(
        point.id,
        Method.KV_ROUTED,
        cost,
        hard_ratio=point.hard_ratio,
        exit_rule=point.exit_rule,
        kv_policy=point.kv_policy,
        batching=point.batching,
        tokens_computed=list(q.tokens_computed),
        tokens_propagated=list(q.tokens_propagated),
    )


def _measure_oracle(point: Point, sweep: Sweep) -> Record:
    result = oracle_bound(sweep.ensemble, sweep.test, sweep.config.oracle_tolerance)
    parameter = next(iter(sweep.ensemble.parameters()))
    return Record(
        point_id=point.id,
        method=Method.ORACLE,
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
        layers_per_stage=list(sweep.ensemble.layers_per_stage),
        conditions={
            **sweep.conditions,
            **environment_conditions(parameter.device, parameter.dtype),
            "note": "analytic cost only; per-stage NLL from the no-exit cascade (later stages see full context)",
        },
    )


def _full_pass(point: Point, record: Record) -> dict:
    return {"method": "full"}


def _prefix_pass(point: Point, record: Record) -> dict:
    return {"method": "full", "num_stages": point.stages}


def _routed_pass(point: Point, record: Record) -> dict:
    arguments = {"method": "routed", "thresholds": record.thresholds, "batching": point.batching}
    return arguments if point.kv_policy is None else {**arguments, "kv_policy": point.kv_policy}


def _masked_pass(point: Point, record: Record) -> dict:
    return {"method": "masked", "thresholds": record.thresholds}


@dataclass(frozen=True)
class MethodRun:
    """How a method is measured (``measure``) and how its measured pass is rerun (``pass_arguments``:
    the ``forward_cascade`` keywords at the record's thresholds; None: no pass to rerun)."""

    measure: Callable[[Point, Sweep], Record]
    pass_arguments: Optional[Callable[[Point, Record], dict]]


METHODS: dict[Method, MethodRun] = {
    Method.FULL: MethodRun(_measure_full, _full_pass),
    Method.PREFIX: MethodRun(_measure_prefix, _prefix_pass),
    Method.DENSE: MethodRun(_measure_dense, _full_pass),
    Method.ROUTED: MethodRun(_measure_routed, _routed_pass),
    Method.MASKED: MethodRun(_measure_masked, _masked_pass),
    Method.RISK_CONTROLLED: MethodRun(_measure_risk_controlled, _routed_pass),
    Method.KV_ROUTED: MethodRun(_measure_kv_routed, _routed_pass),
    Method.ORACLE: MethodRun(_measure_oracle, None),
}
