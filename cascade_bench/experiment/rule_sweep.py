"""The exit rules of one run, built on the trained cascade and switched in turn (``run`` sweeps each).

A rule spec (``stages.exit_rules.RULE_SPECS``) becomes one exit rule per non-last stage:
built-ins by name; ``classifier`` / ``classifier-mlp`` trained per stage with everything else frozen
(train split, early stopping on the validation split); ``lowrank:R`` from the SVD of each stage's
lm_head; ``topk:K`` from the K most frequent ids of the training split.

Classifiers train in stage order. Stage k >= 1 trains on the states the routed pass gives it, so
the earlier stages must route: each earlier stage uses the classifier just trained for it, at the
threshold calibrated (on the validation split) to ``anchor_ratio``, the sweep's hard ratio nearest
0.5. One classifier then serves every swept ratio; at other ratios stage k sees a somewhat
different set of tokens than it was trained on.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from ..data.batch import most_frequent_ids, unpack_batch
from ..measure.distributed import concatenated, same_parameters
from ..routing.calibration import calibrate_thresholds
from ..routing.passes import forward_cascade
from ..stages.ensemble import Ensemble, evaluation_mode
from ..stages.exit_rules import untrained_rule
from ..stages.rule_specs import TOP_K_HEAD, RuleKind, parse_rule_spec
from ..training.exit_classifier import (
    CLASSIFIER_BATCH_TOKENS,
    CLASSIFIER_MAX_TOKENS,
    CLASSIFIER_TRAIN_CONFIG,
    train_exit_classifier,
)


@dataclass
class BuiltRule:
    """One exit rule per non-last stage, and what building it took (classifier training)."""

    spec: str
    per_stage: list
    training: list[dict] = field(default_factory=list)

    @property
    def approximates_max_prob(self) -> bool:
        return parse_rule_spec(self.spec)[0].approximates_max_prob


def build_rule(
    spec: str,
    ensemble: Ensemble,
    train: list,
    validation: list,
    classifier_target: str = "consistency",
    seed: int = 0,
    progress: bool = False,
    max_epochs: Optional[int] = None,
    max_steps_per_epoch: Optional[int] = None,
    max_tokens: Optional[int] = None,
    anchor_ratio: float = 0.5,
) -> BuiltRule:
    """Build ``spec`` for every non-last stage of ``cascade`` (see the module doc). ``max_epochs`` /
    ``max_steps_per_epoch`` cap a classifier's training below its own recipe (the run's caps); with a
    step cap, it also sees only the tokens those steps can use. ``max_tokens``: a classifier's
    features come from at most this many tokens of each split (the first ones; default its own cap)."""
    kind, size = parse_rule_spec(spec)
    non_last = range(len(ensemble) - 1)
    if kind.trained:
        per_stage, training = [], []
        for k in non_last:
            torch.manual_seed(seed + k)
            with routing_through(ensemble, per_stage, validation, anchor_ratio):
                classifier, history = _train_classifier(
                    ensemble,
                    k,
                    train,
                    validation,
                    classifier_target,
                    kind,
                    progress,
                    seed,
                    max_tokens=min(
                        CLASSIFIER_MAX_TOKENS,
                        max_tokens or CLASSIFIER_MAX_TOKENS,
                        CLASSIFIER_MAX_TOKENS
                        if max_steps_per_epoch is None
                        else max_steps_per_epoch * CLASSIFIER_BATCH_TOKENS,
                    ),
                    max_epochs=max_epochs,
                    max_steps_per_epoch=max_steps_per_epoch,
                )
            same_parameters([classifier])  # data-parallel runs: every rank trained it alike; rank 0's counts
            per_stage.append(classifier)
            training.append(_classifier_training(k, spec, classifier_target, anchor_ratio, history.summary()))
        return BuiltRule(spec, per_stage, training)
    ids = most_frequent_ids(train, ensemble.vocab_size, size) if kind.family == TOP_K_HEAD else None
    return BuiltRule(spec, [untrained_rule(spec, ensemble[k], ids) for k in non_last])


def _classifier_training(k: int, spec: str, target: str, anchor_ratio: float, summary: dict) -> dict:
    """What training stage ``k``'s classifier took, as its record's ``rule_training`` entry (its
    early-stopping summary, with BCE where a stage's summary says PPL)."""
    features = (
        "every token (stage 0 sees all)"
        if k == 0
        else f"routed: the tokens continuing past stages 0..{k - 1} at hard ratio {anchor_ratio:g} under this rule"
    )
    return {
        "stage": k,
        "rule": spec,
        "target": target,
        "features": features,
        "epochs": summary["epochs"],
        "best_epoch": summary["best_epoch"],
        "best_validation_bce": summary["best_val_ppl"],
        "stop_reason": summary["stop_reason"],
        "max_epochs": summary["max_epochs"],
        "patience": summary["patience"],
        "seconds": summary["seconds"],
        "validation_bce": summary["val_ppl"],
    }


def _train_classifier(
    ensemble: Ensemble,
    k: int,
    train: list,
    validation: list,
    target: str,
    kind: RuleKind,
    progress: bool,
    seed: int,
    max_tokens: int,
    max_epochs: Optional[int],
    max_steps_per_epoch: Optional[int],
):
    """Stage ``k``'s classifier with the run's caps on the classifier recipe."""
    config = dataclasses.replace(
        CLASSIFIER_TRAIN_CONFIG,
        seed=seed + k,
        max_epochs=min(CLASSIFIER_TRAIN_CONFIG.max_epochs, max_epochs or CLASSIFIER_TRAIN_CONFIG.max_epochs),
        max_steps_per_epoch=max_steps_per_epoch,
    )
    return train_exit_classifier(
        ensemble,
        k,
        train,
        validation,
        target=target,
        hidden_units=kind.hidden_units,
        progress=progress,
        max_tokens=max_tokens,
        config=config,
    )


@contextmanager
def routing_through(ensemble: Ensemble, earlier: list, validation: list, hard_ratio: float):
    """Inside the block the first ``len(earlier)`` stages use those exit rules, at thresholds
    calibrated on ``validation`` to ``hard_ratio``; the later stages never exit. Everything is
    restored after it (``using_rule``)."""
    with using_rule(ensemble, BuiltRule("routing", list(earlier))):
        for stage in ensemble:
            stage.threshold = math.inf
        if earlier:
            calibrate_thresholds(ensemble, validation, hard_ratio, stages=range(len(earlier)))
        yield ensemble


@contextmanager
def using_rule(ensemble: Ensemble, rule: Optional[BuiltRule]):
    """The non-last stages use ``rule`` inside the block (None: leave them as they are); their own
    exit rules and thresholds are restored after it."""
    if rule is None:
        yield ensemble
        return
    saved = [(stage.exit_rule, stage.threshold) for stage in ensemble]
    try:
        for stage, exit_rule in zip(ensemble, rule.per_stage):
            stage.exit_rule = exit_rule
        yield ensemble
    finally:
        for stage, (exit_rule, threshold) in zip(ensemble, saved):
            stage.exit_rule = exit_rule
            stage.threshold = threshold


def stage0_confidences(ensemble: Ensemble, batches: Iterable) -> torch.Tensor:
    """Stage 0's confidence under its current rule for every scored token of ``batches`` (no exit)."""

    def per_batch(item) -> torch.Tensor:
        ids, mask, targets = unpack_batch(item)
        never = [float("inf")] * (len(ensemble) - 1)
        out = forward_cascade(ensemble, ids, mask, targets, method="masked", thresholds=never)
        return out.stage_confidence[0][out.scored]

    with evaluation_mode(ensemble), torch.inference_mode():
        return concatenated(per_batch, batches)


def decision_agreement(
    confidence: torch.Tensor, threshold: float, reference: torch.Tensor, reference_threshold: float
) -> float:
    """Fraction of tokens whose stage-0 exit decision is the same under both rules at their thresholds."""
    if confidence.shape != reference.shape:
        raise ValueError(f"confidences of different token sets: {tuple(confidence.shape)} vs {tuple(reference.shape)}")
    return float(((confidence >= threshold) == (reference >= reference_threshold)).float().mean())
