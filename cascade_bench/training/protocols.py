"""Staged training protocols (docs/design.md section 4): ASHEM and LEGO grow one model, CASCADE chains
separate models; plus the dense, standard and deep-supervision baselines.

``train_ensemble`` starts from stage 0 alone (``start_ensemble``) and trains it on all training
data; then, for each later stage k, it grows the cascade with ``Ensemble.extend`` (after stage k-1
is trained), calibrates stage k-1's threshold at the boundary's hard ratio on the validation split
(with the earlier thresholds in place; ``Protocol.hard_ratio`` is one ratio for every boundary or one
per boundary, LASH's staged thresholds), collects the tokens that continue past stage k-1 (or, with
``hard_examples="sequences"``, the whole sequences whose mean confidence is below the threshold:
the ASHEM seed's hard examples), freezes stages < k, and trains stage k on them only,
early-stopping on the validation PPL of stages 0..k **with early exit on** (the PPL of the tokens
past stage 0 is logged beside it every epoch, as the seeds log "Val PPL | Hard PPL").

What ``extend`` appends depends on the kind of stage the protocol grows (``Protocol.stage_kind``):

- ``"block"`` (ASHEM, LEGO): one model. Stage 0 is a whole small model used as one block (its
  embedding, layers, final norm and head); each later stage is a block of new layers reading the
  residual stream, exiting through a trainable copy of the trained exit head (``exit_head="copy"``)
  or through a frozen one, so only the new layers train (``"frozen"``: the ASHEM stage spec). The
  embedding exists once, in stage 0, and the lower blocks are frozen.
- ``"llm"`` (CASCADE): separate whole models; stage k+1 is a fresh Hugging Face model of the same
  config (its own norm and head) reading stage k's final hidden states; its spec halves the
  learning rate per later model (``lr_decay``) and chooses hard tokens by ``cos_sim``.

``train_protocol`` runs a protocol's training (one function per kind of training, chosen once):
``"staged"`` is ``train_ensemble`` above; ``"joint"`` (deep supervision) trains every block of one
model at once on every token, loss = weighted sum of the exits' cross-entropies (LASH
``layer_weights``), each non-last block exiting through its own head, and early-stops on the routed
validation PPL at the protocol's hard ratio (thresholds recalibrated after every epoch).

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

from ..data.batch import unpack_batch
from ..routing.calibration import calibrate_thresholds
from ..routing.evaluation import EvalResult, evaluate
from ..routing.passes import forward_cascade
from ..stages.blocks import Block
from ..stages.ensemble import Ensemble, evaluation_mode
from ..stages.llm import LLM
from ..stages.presets import build_blocks, build_ensemble
from .loops import (
    TrainConfig,
    TrainHistory,
    collect_hard_sequences,
    collect_hard_tokens,
    exit_loss,
    fit,
    freeze,
    shuffled,
    train_jointly,
    train_llm,
)
from .protocol_specs import (  # noqa: F401  (re-exported: the recipes' torch-free home)
    EXIT_HEADS,
    HARD_EXAMPLES,
    PROTOCOLS,
    Protocol,
    decayed_lrs,
)

#: The kinds of stage a protocol grows: blocks of one model, or separate whole models.
STAGE_KINDS = {"block": Block, "llm": LLM}


@dataclass(frozen=True)
class StageReport:
    """What training stage k did: its history, the threshold set on stage k-1, how many hard
    tokens it trained on, routed validation results of stages 0..k afterwards, and the parameters
    it trained out of those of stages 0..k (each tensor counted once). ``selection`` (sequence-level
    hard examples): hard and all sequences, and the mean of their mean confidences."""

    stage: int
    history: TrainHistory
    threshold_before: Optional[float]
    hard_tokens: int
    hard_tokens_spilled_shards: int
    validation: EvalResult
    trainable_parameters: int = 0
    parameters: int = 0
    selection: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingReport:
    """Staged training: one ``StageReport`` per stage. Joint training: ``joint`` holds the one history
    of all stages together, and ``validation`` the routed validation result after it."""

    protocol: Protocol
    stages: tuple[StageReport, ...] = field(default_factory=tuple)
    joint: Optional[TrainHistory] = None
    validation: Optional[EvalResult] = None


def _validation(ensemble: Ensemble, batches, k: int):
    """Stage k's early-stopping score: the routed validation PPL of stages 0..k (later stages are not
    trained yet). From stage 1 on, the PPL of the tokens that continued past stage 0 is logged beside it
    (the seeds' "Val PPL | Hard PPL")."""

    def score():
        result = evaluate(ensemble, batches, method="routed", num_stages=k + 1)
        return result.ppl if k == 0 else (result.ppl, {"hard PPL": result.hard_ppl})

    return score


def _count(parameters) -> int:
    """Parameters counted once each (a tied embedding and head is one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in parameters}.values())


def start_ensemble(
    protocol: Protocol,
    preset: str,
    exit_rule=None,
    seed: Optional[int] = 0,
    device: "str | torch.device" = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Ensemble:
    """Stage 0 of ``protocol``, freshly initialised from ``preset`` (config overrides in standard
    names, e.g. ``vocab_size``): one block that is a whole small model (``"block"`` protocols) or one
    LLM (``"llm"``). ``train_ensemble`` grows the rest."""
    build = build_blocks if protocol.stage_kind == "block" else build_ensemble
    if protocol.training == "joint":  # every block from the start, non-last ones with their own heads
        return build_blocks(
            preset,
            protocol.layers,
            exit_rule=exit_rule or protocol.exit_rule,
            seed=seed,
            device=device,
            dtype=dtype,
            heads="own",
            **overrides,
        )
    return build(
        preset,
        (protocol.layers[0],),
        exit_rule=exit_rule or protocol.exit_rule,
        seed=seed,
        device=device,
        dtype=dtype,
        **overrides,
    )


def _check_start(ensemble: Ensemble, protocol: Protocol, trained_stages: int = 0) -> None:
    kind = STAGE_KINDS[protocol.stage_kind]
    start = max(trained_stages, 1)
    if not 0 <= trained_stages < len(protocol.layers):
        raise ValueError(
            f"trained_stages must be in 0..{len(protocol.layers) - 1} for protocol {protocol.name!r}, "
            f"got {trained_stages}"
        )
    if len(ensemble) != start or ensemble.layers_per_stage != protocol.layers[:start]:
        raise ValueError(
            f"protocol {protocol.name!r} grows its cascade from stage 0 ({protocol.layers[0]} layers) "
            f"to {protocol.layers}; pass stage 0 alone (protocols.start_ensemble) or the stages trained "
            f"so far ({protocol.layers[:start]} for trained_stages={trained_stages}), got stages of "
            f"{ensemble.layers_per_stage} layers"
        )
    if not all(isinstance(stage, kind) for stage in ensemble):
        raise TypeError(
            f"protocol {protocol.name!r} grows {protocol.stage_kind} stages ({kind.__name__}); got "
            f"{[type(s).__name__ for s in ensemble]} (build stage 0 with protocols.start_ensemble)"
        )


def train_ensemble(
    ensemble: Ensemble,
    train_batches: Sequence,
    validation_batches: Sequence,
    protocol: Protocol = PROTOCOLS["ashem"],
    seed: int = 0,
    max_steps_per_epoch: Optional[int] = None,
    memory_budget_bytes: int = 1 << 30,
    progress: bool = True,
    trained_stages: int = 0,
) -> TrainingReport:
    """Train stage 0 of ``ensemble`` (freshly built by ``start_ensemble``), then grow and train one
    stage per remaining entry of ``protocol.layers`` (see module docstring). The new stages are
    initialised from ``seed`` (stage k: ``seed + k``). Thresholds of stages 0..S-2 are left calibrated.

    ``trained_stages=n`` continues a cascade whose first n stages this protocol already trained (e.g. a
    stage 0 trained with ``protocol.prefix(1)`` and saved, shared by runs that differ only later): it
    grows and trains stages n.. exactly as one uninterrupted call would (every stage seeds its own
    initialisation and shuffling), and the report holds the stages this call trained."""
    if protocol.training != "staged":
        raise ValueError(f"protocol {protocol.name!r} trains its stages jointly; use train_protocol")
    _check_start(ensemble, protocol, trained_stages)
    reports = []
    for k in range(trained_stages, len(protocol.layers)):
        config = protocol.stage_config(k, seed, max_steps_per_epoch)
        threshold, spilled, selection = None, 0, {}
        if k == 0:
            stage = ensemble[0]
            data = list(train_batches)
            hard_count = sum(int((b["targets"] >= 0).sum()) for b in data)
        else:
            torch.manual_seed(seed + k)
            stage = ensemble.extend(protocol.layers[k])
            hard_ratio = protocol.boundary_hard_ratios[k - 1]
            threshold = calibrate_thresholds(ensemble, validation_batches, hard_ratio, stages=[k - 1])[0]
            source = validation_batches if protocol.leaky_seed_protocol else train_batches
            if protocol.hard_examples == "sequences":
                hard = collect_hard_sequences(
                    ensemble, k, source, threshold, memory_budget_bytes=memory_budget_bytes, progress=progress
                )
                means = torch.cat(hard.mean_confidences)
                chosen = torch.cat([m[i] for m, i in zip(hard.mean_confidences, hard.flat_indices)])
                selection = {
                    "hard_sequences": int(chosen.numel()),
                    "sequences": int(means.numel()),
                    "mean_confidence": float(means.mean()),
                    "hard_mean_confidence": float(chosen.mean()) if chosen.numel() else math.nan,
                }
            else:
                hard = collect_hard_tokens(
                    ensemble, k, source, memory_budget_bytes=memory_budget_bytes, progress=progress
                )
                selection = {}
            data, hard_count, spilled = hard, hard.num_tokens, hard.spilled
            if hard_count == 0:
                raise ValueError(
                    f"no {'sequence' if protocol.hard_examples == 'sequences' else 'token'} was hard "
                    f"past stage {k - 1} at hard ratio {hard_ratio}; nothing to train stage {k} on"
                )
            freeze(ensemble.stages[:k])
            if protocol.exit_head == "frozen":
                freeze([stage.head])
        # Stages after k are not trained yet: route everyone through 0..k only.
        history = train_llm(
            stage,
            data,
            _validation(ensemble, validation_batches, k),
            config,
            progress=progress,
            desc=f"{protocol.name} stage {k}",
        )
        validation = evaluate(
            ensemble,
            validation_batches,
            num_stages=k + 1,
            conditions={"split": "validation", "protocol": protocol.name},
        )
        reports.append(
            StageReport(
                stage=k,
                history=history,
                threshold_before=threshold,
                hard_tokens=hard_count,
                hard_tokens_spilled_shards=spilled,
                validation=validation,
                trainable_parameters=_count(p for p in stage.parameters() if p.requires_grad),
                parameters=_count(ensemble.parameters()),
                selection=selection,
            )
        )
    return TrainingReport(protocol=protocol, stages=tuple(reports))


def train_joint_protocol(
    ensemble: Ensemble,
    train_batches: Sequence,
    validation_batches: Sequence,
    protocol: Protocol,
    seed: int = 0,
    max_steps_per_epoch: Optional[int] = None,
    progress: bool = True,
    trained_stages: int = 0,
    **_unused,
) -> TrainingReport:
    """Joint training (deep supervision) of every block of ``ensemble`` (built by ``start_ensemble``):
    loss = weighted exits (``protocol.layer_weights``), early stopping on the routed validation PPL
    with thresholds recalibrated at ``protocol.hard_ratio`` after each epoch (left calibrated)."""
    if trained_stages:
        raise ValueError(
            f"protocol {protocol.name!r} trains all its blocks at once; trained_stages must be 0, got {trained_stages}"
        )
    if ensemble.layers_per_stage != protocol.layers or not all(isinstance(s, Block) for s in ensemble):
        raise ValueError(
            f"protocol {protocol.name!r} trains blocks of {protocol.layers} layers jointly; build them "
            f"with protocols.start_ensemble (got {[type(s).__name__ for s in ensemble]} of "
            f"{ensemble.layers_per_stage} layers)"
        )

    def routed_validation_ppl() -> float:
        calibrate_thresholds(ensemble, validation_batches, protocol.boundary_hard_ratios)
        return evaluate(ensemble, validation_batches, method="routed").ppl

    history = train_jointly(
        ensemble,
        train_batches,
        routed_validation_ppl,
        protocol.layer_weights,
        protocol.stage_config(0, seed, max_steps_per_epoch),
        progress=progress,
        desc=f"{protocol.name} (joint)",
    )
    calibrate_thresholds(ensemble, validation_batches, protocol.boundary_hard_ratios)
    validation = evaluate(ensemble, validation_batches, conditions={"split": "validation", "protocol": protocol.name})
    return TrainingReport(protocol=protocol, joint=history, validation=validation)


#: One training function per kind of training (``Protocol.training``).
TRAINERS = {"staged": train_ensemble, "joint": train_joint_protocol}


def train_protocol(
    ensemble: Ensemble,
    train_batches: Sequence,
    validation_batches: Sequence,
    protocol: Protocol,
    seed: int = 0,
    max_steps_per_epoch: Optional[int] = None,
    memory_budget_bytes: int = 1 << 30,
    progress: bool = True,
    trained_stages: int = 0,
) -> TrainingReport:
    """Train ``ensemble`` (from ``start_ensemble(protocol, ...)``) the way ``protocol`` says;
    ``trained_stages`` as in ``train_ensemble`` (staged protocols only)."""
    return TRAINERS[protocol.training](
        ensemble,
        train_batches,
        validation_batches,
        protocol,
        seed=seed,
        max_steps_per_epoch=max_steps_per_epoch,
        memory_budget_bytes=memory_budget_bytes,
        progress=progress,
        trained_stages=trained_stages,
    )


def train_dense_baseline(
    model_stage,
    train_batches: Sequence,
    validation_batches: Sequence,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> TrainHistory:
    """A single stage of the cascade's total depth, trained on all data (the dense baseline)."""
    dense = Ensemble([model_stage])
    return train_llm(
        model_stage,
        train_batches,
        lambda: evaluate(dense, validation_batches, method="full").ppl,
        config,
        progress=progress,
        desc="dense",
    )


def train_joint_baseline(
    ensemble: Ensemble,
    train_batches: Sequence,
    validation_batches: Sequence,
    layer_weights: Sequence[float],
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> TrainHistory:
    """Standard (weights 0..0,1) or deep-supervision training of all stages on all data,
    early-stopping on the full-cascade validation PPL (no early exit during training)."""
    return train_jointly(
        ensemble,
        train_batches,
        lambda: evaluate(ensemble, validation_batches, method="full").ppl,
        layer_weights,
        config,
        progress=progress,
        desc="standard" if list(layer_weights)[:-1] == [0] * (len(ensemble) - 1) else "deep",
    )


def exit_heads_ppl(ensemble: Ensemble, batches) -> tuple[float, ...]:
    """Per non-last stage, the PPL of its exit head over every scored token (no early exit: each
    stage sees the full context, as when the heads are trained)."""
    num_stages = len(ensemble)
    nll = torch.zeros(num_stages - 1, dtype=torch.float64)
    count = 0
    with evaluation_mode(ensemble), torch.inference_mode():
        for item in batches:
            input_ids, attention_mask, targets = unpack_batch(item)
            out = forward_cascade(
                ensemble, input_ids, attention_mask, targets, method="masked", thresholds=[math.inf] * num_stages
            )
            nll += out.stage_nll[:-1, out.scored].double().sum(dim=1).cpu()
            count += int(out.scored.sum())
    return tuple(math.exp(float(v) / count) for v in nll)


def train_exit_heads(
    ensemble: Ensemble,
    train_batches: Sequence,
    validation_batches: Sequence,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> TrainHistory:
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
            raise TypeError(
                f"stage {k} is a {type(stage).__name__}; train_exit_heads trains the exit heads of "
                f"Blocks (Ensemble.from_blocks(..., heads='own'))"
            )
        if any(id(p) in last_params for p in stage.head.parameters()):
            raise ValueError(
                f"block {k} exits through the model's own norm + lm_head (heads='shared'); training "
                f"it would change the model itself: build the blocks with heads='own'"
            )
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
        return fit(
            parameters,
            heads,
            shuffled(list(train_batches), config.seed),
            loss_fn,
            validate,
            config,
            ensemble.device,
            progress,
            desc="exit heads",
        )


def with_leaky_seed_protocol(protocol: Protocol) -> Protocol:
    """The same recipe with the seeds' leaky data protocol (see module docstring)."""
    return replace(protocol, name=protocol.name + "-leaky", leaky_seed_protocol=True)


__all__ = [
    "EXIT_HEADS",
    "HARD_EXAMPLES",
    "PROTOCOLS",
    "STAGE_KINDS",
    "TRAINERS",
    "Protocol",
    "StageReport",
    "TrainingReport",
    "exit_heads_ppl",
    "start_ensemble",
    "train_dense_baseline",
    "train_ensemble",
    "train_exit_heads",
    "train_joint_baseline",
    "train_joint_protocol",
    "train_protocol",
    "with_leaky_seed_protocol",
    "decayed_lrs",
]
