"""Staged training protocols (DESIGN.md section 4): ASHEM, LEGO-style extension, and baselines.

``train_ensemble`` trains stage 0 on all training data, then for each later stage k:
calibrate stage k-1's threshold at the target hard ratio on the validation split (with the
earlier thresholds in place), collect the tokens that continue past stage k-1, freeze stages
< k, and train stage k on those tokens only, early-stopping on the validation PPL of stages
0..k **with early exit on**.

Default data protocol: collect hard tokens from the train split, calibrate on validation,
report on test. ``leaky_seed_protocol=True`` reproduces the seeds instead: hard tokens are
collected from the validation split, and the report on them scores stage k on its own
training data. Use it only to compare with the seeds' published figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from .batch import unpack_batch
from .blocks import Block
from .calibration import calibrate_thresholds
from .ensemble import Ensemble, evaluation_mode
from .evaluation import EvalResult, evaluate
from .routing import forward_cascade
from .training import (TrainConfig, TrainHistory, collect_hard_tokens, exit_loss, fit, freeze, shuffled,
                       train_jointly, train_llm)


@dataclass(frozen=True)
class Protocol:
    """A staged training recipe: per stage layers, learning rate and patience; one hard ratio."""

    name: str
    layers: tuple[int, ...]
    lrs: tuple[float, ...]
    patience: tuple[int, ...]
    hard_ratio: float = 0.5
    exit_fn: str = "max_prob"
    max_epochs: int = 10
    leaky_seed_protocol: bool = False

    def __post_init__(self):
        n = len(self.layers)
        if n < 1 or len(self.lrs) != n or len(self.patience) != n:
            raise ValueError(f"protocol {self.name!r}: layers, lrs and patience need one entry per stage, got "
                             f"{len(self.layers)}, {len(self.lrs)}, {len(self.patience)}")
        if not 0.0 < self.hard_ratio < 1.0:
            raise ValueError(f"protocol {self.name!r}: hard_ratio must be in (0, 1), got {self.hard_ratio}")

    def stage_config(self, k: int, seed: int, max_steps_per_epoch: Optional[int] = None) -> TrainConfig:
        return TrainConfig(lr=self.lrs[k], patience=self.patience[k], max_epochs=self.max_epochs, seed=seed + k,
                           max_steps_per_epoch=max_steps_per_epoch)


#: The seeds' recipes. ASHEM: 2 layers on all data (lr 1e-3, patience 1), then 2 more on the hard half
#: (lr 1e-4, patience 3). LEGO-3: the same extended once more ("extend" with new blocks).
PROTOCOLS: dict[str, Protocol] = {
    "ashem": Protocol("ashem", layers=(2, 2), lrs=(1e-3, 1e-4), patience=(1, 3), hard_ratio=0.5),
    "lego-3": Protocol("lego-3", layers=(2, 2, 2), lrs=(1e-3, 1e-4, 1e-4), patience=(1, 3, 3), hard_ratio=0.5),
}


@dataclass(frozen=True)
class StageReport:
    """What training stage k did: its history, the threshold set on stage k-1, how many hard
    tokens it trained on, and routed validation results of stages 0..k afterwards."""

    stage: int
    history: TrainHistory
    threshold_before: Optional[float]
    hard_tokens: int
    hard_tokens_spilled_shards: int
    validation: EvalResult


@dataclass(frozen=True)
class TrainingReport:
    protocol: Protocol
    stages: tuple[StageReport, ...] = field(default_factory=tuple)


def _routed_ppl(ensemble: Ensemble, batches, num_stages: int) -> float:
    return evaluate(ensemble, batches, method="routed", num_stages=num_stages).ppl


def train_ensemble(ensemble: Ensemble, train_batches: Sequence, validation_batches: Sequence,
                   protocol: Protocol = PROTOCOLS["ashem"], seed: int = 0,
                   max_steps_per_epoch: Optional[int] = None, memory_budget_bytes: int = 1 << 30,
                   progress: bool = True) -> TrainingReport:
    """Train ``ensemble`` (freshly built, one stage per ``protocol.layers``) stage by stage
    (see module docstring); thresholds of stages 0..S-2 are left calibrated."""
    if ensemble.layers_per_stage != protocol.layers:
        raise ValueError(f"protocol {protocol.name!r} wants stages of {protocol.layers} layers, the ensemble has "
                         f"{ensemble.layers_per_stage}")
    reports = []
    for k, stage in enumerate(ensemble):
        config = protocol.stage_config(k, seed, max_steps_per_epoch)
        threshold, spilled = None, 0
        if k == 0:
            data = list(train_batches)
            hard_count = sum(int((b["targets"] >= 0).sum()) for b in data)
        else:
            threshold = calibrate_thresholds(ensemble, validation_batches, protocol.hard_ratio, stages=[k - 1])[0]
            source = validation_batches if protocol.leaky_seed_protocol else train_batches
            hard = collect_hard_tokens(ensemble, k, source, memory_budget_bytes=memory_budget_bytes,
                                       progress=progress)
            data, hard_count, spilled = hard, hard.num_tokens, hard.spilled
            if hard_count == 0:
                raise ValueError(f"no token continued past stage {k - 1} at hard ratio {protocol.hard_ratio}; "
                                 f"nothing to train stage {k} on")
            freeze(ensemble.stages[:k])
        # Stages after k are not trained yet: route everyone through 0..k only.
        history = train_llm(stage, data, lambda k=k: _routed_ppl(ensemble, validation_batches, k + 1), config,
                            progress=progress, desc=f"{protocol.name} stage {k}")
        validation = evaluate(ensemble, validation_batches, num_stages=k + 1,
                              conditions={"split": "validation", "protocol": protocol.name})
        reports.append(StageReport(stage=k, history=history, threshold_before=threshold, hard_tokens=hard_count,
                                   hard_tokens_spilled_shards=spilled, validation=validation))
    return TrainingReport(protocol=protocol, stages=tuple(reports))


def train_dense_baseline(model_stage, train_batches: Sequence, validation_batches: Sequence,
                         config: TrainConfig = TrainConfig(), progress: bool = True) -> TrainHistory:
    """A single stage of the cascade's total depth, trained on all data (the dense baseline)."""
    dense = Ensemble([model_stage])
    return train_llm(model_stage, train_batches, lambda: evaluate(dense, validation_batches, method="full").ppl,
                     config, progress=progress, desc="dense")


def train_joint_baseline(ensemble: Ensemble, train_batches: Sequence, validation_batches: Sequence,
                         layer_weights: Sequence[float], config: TrainConfig = TrainConfig(),
                         progress: bool = True) -> TrainHistory:
    """Standard (weights 0..0,1) or deep-supervision training of all stages on all data,
    early-stopping on the full-cascade validation PPL (no early exit during training)."""
    return train_jointly(ensemble, train_batches, lambda: evaluate(ensemble, validation_batches, method="full").ppl,
                         layer_weights, config, progress=progress,
                         desc="standard" if list(layer_weights)[:-1] == [0] * (len(ensemble) - 1) else "deep")


def exit_heads_ppl(ensemble: Ensemble, batches) -> tuple[float, ...]:
    """Per non-last stage, the PPL of its exit head over every scored token (no early exit: each
    stage sees the full context, as when the heads are trained)."""
    num_stages = len(ensemble)
    nll = torch.zeros(num_stages - 1, dtype=torch.float64)
    count = 0
    with evaluation_mode(ensemble), torch.inference_mode():
        for item in batches:
            input_ids, attention_mask, targets = unpack_batch(item)
            out = forward_cascade(ensemble, input_ids, attention_mask, targets, method="masked",
                                  thresholds=[math.inf] * num_stages)
            nll += out.stage_nll[:-1, out.scored].double().sum(dim=1).cpu()
            count += int(out.scored.sum())
    return tuple(math.exp(float(v) / count) for v in nll)


def train_exit_heads(ensemble: Ensemble, train_batches: Sequence, validation_batches: Sequence,
                     config: TrainConfig = TrainConfig(), progress: bool = True) -> TrainHistory:
    """Add early exit to a pretrained model the usual way: the trunk (every layer, embedding and the
    model's own norm + lm_head) frozen and in eval mode; only the non-last blocks' own exit heads
    train, on every token, loss = mean over those heads of their cross-entropy. Early stopping on
    the geometric mean of the heads' validation PPLs. Build the blocks with ``heads="own"``."""
    if len(ensemble) < 2:
        raise ValueError("train_exit_heads needs at least two blocks (the last one exits through the model's head)")
    last_params = {id(p) for p in ensemble[-1].parameters()}
    heads = []
    for k, stage in enumerate(ensemble.stages[:-1]):
        if not isinstance(stage, Block):
            raise TypeError(f"stage {k} is a {type(stage).__name__}; train_exit_heads trains the exit heads of "
                            f"Blocks (Ensemble.from_blocks(..., heads='own'))")
        if any(id(p) in last_params for p in stage.head.parameters()):
            raise ValueError(f"block {k} exits through the model's own norm + lm_head (heads='shared'); training "
                             f"it would change the model itself: build the blocks with heads='own'")
        heads.append(stage.head)
    for parameter in ensemble.parameters():
        parameter.requires_grad_(False)
    parameters = []
    for head in heads:
        for parameter in head.parameters():
            parameter.requires_grad_(True)
            parameters.append(parameter)

    def validate() -> float:
        ppls = exit_heads_ppl(ensemble, validation_batches)
        return math.exp(sum(math.log(p) for p in ppls) / len(ppls))

    loss_fn = exit_loss(ensemble, [1.0] * (len(ensemble) - 1) + [0.0])
    with evaluation_mode(ensemble):
        return fit(parameters, heads, shuffled(list(train_batches), config.seed), loss_fn, validate, config,
                   ensemble.device, progress, desc="exit heads")


def with_leaky_seed_protocol(protocol: Protocol) -> Protocol:
    """The same recipe with the seeds' leaky data protocol (see module docstring)."""
    return replace(protocol, name=protocol.name + "-leaky", leaky_seed_protocol=True)


__all__ = ["PROTOCOLS", "Protocol", "StageReport", "TrainingReport", "exit_heads_ppl", "train_dense_baseline",
           "train_ensemble", "train_exit_heads", "train_joint_baseline", "with_leaky_seed_protocol"]
