"""Calibration: per-stage thresholds such that a target fraction of tokens continues (docs/design.md section 1)."""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from ..data.batch import unpack_batch
from ..measure.distributed import concatenated
from ..stages.ensemble import Ensemble, evaluation_mode
from .passes import forward_cascade
from .stage_reuse import RuleReuse, reuse_for


def _check_ratio(hard_ratio) -> float:
    if isinstance(hard_ratio, bool) or not isinstance(hard_ratio, (int, float)) or not 0.0 <= hard_ratio <= 1.0:
        raise ValueError(
            f"hard_ratio must be a number in [0, 1] (fraction of tokens that continue), got {hard_ratio!r}"
        )
    return float(hard_ratio)


def threshold_for_hard_ratio(confidence: Tensor, hard_ratio: float) -> float:
    """Threshold t over per-token confidences (N,) such that ceil(hard_ratio * N) tokens have
    confidence < t (they continue) and the rest exit (confidence >= t).

    This is the order statistic sorted[ceil(r N)] (+inf when r = 1): exact without ties; with ties
    at t, the tied tokens exit, so at most ceil(r N) continue.
    """
    hard_ratio = _check_ratio(hard_ratio)
    confidence = confidence.reshape(-1).float()
    if confidence.numel() == 0:
        raise ValueError("cannot calibrate a threshold on zero tokens")
    if not bool(torch.isfinite(confidence).all()):
        raise ValueError("confidences contain NaN or inf; cannot calibrate a threshold on them")
    continuing = math.ceil(hard_ratio * confidence.numel())
    if continuing >= confidence.numel():
        return math.inf
    return float(torch.kthvalue(confidence.cpu(), continuing + 1).values)


def calibrate_thresholds(
    ensemble: Ensemble,
    batches: Iterable,
    hard_ratio: "float | Sequence[float]",
    stages: Optional[Sequence[int]] = None,
    **forward_kwargs,
) -> tuple[float, ...]:
    """Set and return the thresholds of ``stages`` (default: 0..S-2), in increasing order.

    Stage k's threshold is calibrated on the confidences of the tokens that actually reach it
    under the thresholds already set for stages < k, so the hard ratio of them continue: ``hard_ratio``
    is one for every calibrated stage, or one per stage (``hard_ratio[i]`` for ``stages[i]``).
    ``batches`` is iterated once per calibrated stage (pass a list or a re-iterable loader).
    The confidences are collected with ``measure.distributed.concatenated``: inside ``sharded`` each
    rank runs its share and gets everyone's, so the thresholds are the same exact quantiles as in
    one process.
    """
    stages = list(range(len(ensemble) - 1)) if stages is None else sorted(stages)
    if any(not 0 <= k < len(ensemble) - 1 for k in stages):
        raise ValueError(f"can calibrate stages 0..{len(ensemble) - 2} (the last always exits), got {stages}")
    ratios = [hard_ratio] * len(stages) if isinstance(hard_ratio, (int, float)) else list(hard_ratio)
    if len(ratios) != len(stages):
        raise ValueError(f"expected {len(stages)} hard ratios for stages {stages}, got {len(ratios)}")
    ratios = dict(zip(stages, (_check_ratio(r) for r in ratios)))
    thresholds = list(ensemble.thresholds)
    for k in stages:
        with evaluation_mode(ensemble), torch.inference_mode():
            confidence = concatenated(
                _reaching(ensemble, thresholds[:k], k, forward_kwargs), list(enumerate(batches)), "calibration"
            )
        thresholds[k] = threshold_for_hard_ratio(confidence, ratios[k])
        ensemble[k].threshold = thresholds[k]
    return tuple(thresholds[k] for k in stages)


def calibrate_sweep(
    ensemble: Ensemble,
    batches: Iterable,
    hard_ratios: Sequence[float],
    reuse: Optional[RuleReuse] = None,
    **forward_kwargs,
) -> dict[float, tuple[float, ...]]:
    """{ratio: thresholds} for every ratio of a sweep, each equal to what ``calibrate_thresholds``
    gives for that ratio alone (same order statistics), but stage 0's confidences are collected
    once for all ratios (they do not depend on any threshold); later stages are calibrated per
    ratio. The ensemble's thresholds are left as they were. ``reuse``: ``stage_reuse`` kept for
    ``batches`` under the rule in place (stage 0's pass over them reads it)."""
    ratios = [_check_ratio(r) for r in hard_ratios]
    before = ensemble.thresholds
    with evaluation_mode(ensemble), torch.inference_mode():
        stage0 = _reaching(ensemble, [], 0, forward_kwargs, reuse)
        confidence = concatenated(stage0, list(enumerate(batches)), "calibration")
    sweep = {}
    try:
        for ratio in ratios:
            first = threshold_for_hard_ratio(confidence, ratio)
            ensemble[0].threshold = first
            later = (
                calibrate_thresholds(ensemble, batches, ratio, stages=range(1, len(ensemble) - 1), **forward_kwargs)
                if len(ensemble) > 2
                else ()
            )
            sweep[ratio] = (first, *later)
    finally:
        ensemble.set_thresholds(before)
    return sweep


def _reaching(ensemble: Ensemble, earlier: list, k: int, forward_kwargs: dict, reuse: Optional[RuleReuse] = None):
    """Per (index, batch): stage k's confidence for the tokens that reach it under the ``earlier``
    stages' thresholds (the routed pass up to stage k, which exits nobody)."""

    def per_batch(indexed) -> Tensor:
        index, item = indexed
        input_ids, attention_mask, targets = unpack_batch(item)
        out = forward_cascade(
            ensemble,
            input_ids,
            attention_mask,
            targets,
            method="routed",
            thresholds=list(earlier) + [math.inf],
            num_stages=k + 1,
            confidence_at_last_stage=True,
            reuse=reuse_for(reuse, index),
            **forward_kwargs,
        )
        return out.stage_confidence[k][out.exit_stage == k]

    return per_batch
