"""Training a learned exit classifier (CALM) for one non-last stage, everything else frozen.

Features: the stage's output state (and, if asked, the input state of its last layer) as the
routed pass computes it. Stage 0 sees every token (its states are the ``full`` pass's); stage
k >= 1 sees only the tokens that continue past the earlier stages, gathered at compact positions,
so its features come from the routed pass at the earlier stages' current exit rules and thresholds
(``stage_states(routed_thresholds=...)``), over the tokens that reach stage k. Labels, by ``target``:

- ``"consistency"`` (CALM): stage k's argmax equals the last stage's argmax (full depth from
  stage k on: nobody exits at or after stage k);
- ``"correctness"``: stage k's argmax equals the target token.

Binary cross-entropy, AdamW, early stopping on the validation BCE (``loops.fit``); the classifier's
sigmoid becomes the stage's confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor

from ..data.batch import unpack_batch
from ..routing.exit_head import run_exit_head
from ..routing.passes import stage_states
from ..stages.ensemble import Ensemble, evaluation_mode
from ..stages.exit_rules import ExitClassifier
from .loops import TrainConfig, TrainHistory, fit

#: Tokens per optimiser step (features are small: d floats per token).
CLASSIFIER_BATCH_TOKENS = 1024
#: Default training recipe: a probe on fixed features converges in a few epochs at this rate.
CLASSIFIER_TRAIN_CONFIG = TrainConfig(lr=3e-3, max_epochs=30, patience=2, weight_decay=0.0)
#: Tokens of each split the classifier trains / validates on by default (the first ones): features
#: are d floats per token, so a large corpus would otherwise not fit in memory.
CLASSIFIER_MAX_TOKENS = 1 << 18


@dataclass
class ExitLabels:
    """Features and labels of one split: h_out (N, d), h_in (N, d) or None, label (N,) float32 in {0, 1}."""

    h_out: Tensor
    h_in: Optional[Tensor]
    label: Tensor

    @property
    def positive_rate(self) -> float:
        return float(self.label.mean()) if self.label.numel() else float("nan")


def exit_labels(
    ensemble: Ensemble,
    stage_index: int,
    batches: Iterable,
    target: str = "consistency",
    use_input_state: bool = False,
    max_tokens: Optional[int] = None,
) -> ExitLabels:
    """Features and labels for stage ``stage_index``'s classifier over ``batches`` (see module doc);
    at most ``max_tokens`` tokens (the first ones), None = all."""
    if isinstance(stage_index, bool) or not isinstance(stage_index, int) or not 0 <= stage_index < len(ensemble) - 1:
        raise ValueError(f"stage_index must be a non-last stage in [0, {len(ensemble) - 2}], got {stage_index!r}")
    if target not in ("consistency", "correctness"):
        raise ValueError(f"target must be 'consistency' or 'correctness', got {target!r}")
    depth = len(ensemble) if target == "consistency" else stage_index + 1
    # stage k >= 1: the routed pass, earlier stages at their thresholds, nobody exiting from stage k on
    routed = (*ensemble.thresholds[:stage_index], *(math.inf,) * (depth - stage_index)) if stage_index else None
    outs, ins, labels, kept = [], [], [], 0
    with evaluation_mode(ensemble), torch.inference_mode():
        for item in batches:
            ids, mask, targets = unpack_batch(item)
            states = stage_states(
                ensemble,
                ids,
                mask,
                targets,
                num_stages=depth,
                capture_input_state=use_input_state,
                routed_thresholds=routed,
            )
            scored = states.stage_targets[stage_index] >= 0
            targets_k = states.stage_targets[stage_index][scored]
            hidden = states.hidden[stage_index][scored]
            prediction = run_exit_head(ensemble[stage_index], stage_index, hidden, targets_k).prediction
            if target == "consistency":
                last = len(ensemble) - 1
                if not torch.equal(states.reach[last], states.reach[stage_index]):
                    raise RuntimeError(
                        "the tokens reaching the last stage are not those reaching stage "
                        f"{stage_index}, though nobody exits in between"
                    )
                reference = run_exit_head(ensemble[last], last, states.hidden[last][scored], targets_k).prediction
            else:
                reference = targets_k
            outs.append(hidden.float().cpu())
            if use_input_state:
                ins.append(states.input_state[stage_index][scored].float().cpu())
            labels.append((prediction == reference).float().cpu())
            kept += int(scored.sum())
            if max_tokens is not None and kept >= max_tokens:
                break
    if not labels:
        raise ValueError("exit_labels got no batches")
    cut = slice(0, max_tokens)
    return ExitLabels(
        h_out=torch.cat(outs)[cut], h_in=torch.cat(ins)[cut] if use_input_state else None, label=torch.cat(labels)[cut]
    )


def classifier_bce(classifier: ExitClassifier, data: ExitLabels, chunk: int = 1 << 15) -> float:
    """Mean binary cross-entropy of ``classifier`` on ``data`` (lower is better)."""
    total = 0.0
    device = next(classifier.parameters()).device
    with torch.no_grad():
        for start in range(0, data.label.numel(), chunk):
            stop = start + chunk
            h_in = None if data.h_in is None else data.h_in[start:stop].to(device)
            logit = classifier.logit(h_in, data.h_out[start:stop].to(device)).float()
            total += float(
                torch.nn.functional.binary_cross_entropy_with_logits(
                    logit, data.label[start:stop].to(device), reduction="sum"
                )
            )
    return total / max(data.label.numel(), 1)


def train_exit_classifier(
    ensemble: Ensemble,
    stage_index: int,
    train_batches: Iterable,
    validation_batches: Iterable,
    target: str = "consistency",
    hidden_units: int = 0,
    use_input_state: bool = False,
    config: TrainConfig = CLASSIFIER_TRAIN_CONFIG,
    max_tokens: Optional[int] = CLASSIFIER_MAX_TOKENS,
    progress: bool = False,
) -> tuple[ExitClassifier, TrainHistory]:
    """Train a new ``ExitClassifier`` for stage ``stage_index`` (the stages stay frozen and are not
    modified); returns it (on the stage's device and dtype, in eval mode) and its history, whose
    ``val_ppl`` holds the validation BCE per epoch. Attach it with ``ensemble[k].exit_rule = clf``."""
    stage = ensemble[stage_index]
    train = exit_labels(ensemble, stage_index, train_batches, target, use_input_state, max_tokens)
    validation = exit_labels(ensemble, stage_index, validation_batches, target, use_input_state, max_tokens)
    torch.manual_seed(config.seed)
    classifier = ExitClassifier(stage.hidden_size, hidden_units, use_input_state, target).to(stage.device)

    def epoch_batches(epoch: int):
        order = torch.randperm(train.label.numel(), generator=torch.Generator().manual_seed(config.seed + epoch))
        for start in range(0, order.numel(), CLASSIFIER_BATCH_TOKENS):
            index = order[start : start + CLASSIFIER_BATCH_TOKENS]
            batch = {"h_out": train.h_out[index], "label": train.label[index]}
            if train.h_in is not None:
                batch["h_in"] = train.h_in[index]
            yield batch

    def loss_fn(batch: dict) -> tuple[Tensor, int]:
        logit = classifier.logit(batch.get("h_in"), batch["h_out"]).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, batch["label"])
        return loss, int(batch["label"].numel())

    history = fit(
        list(classifier.parameters()),
        [classifier],
        epoch_batches,
        loss_fn,
        lambda: classifier_bce(classifier, validation),
        config,
        stage.device,
        progress=progress,
        desc=f"exit classifier stage {stage_index}",
        metric="BCE",
    )
    return classifier.to(dtype=stage.dtype).eval(), history
