"""Fit one exit translator per candidate layer of a frozen pretrained model.

A ``Translator`` (``stages.blocks``) maps the residual stream after layer l so that the model's own
final norm + lm_head (frozen, shared) read it as they read the last layer's. Both fits read the
states ``measure.layer_exits.collect_layer_states`` kept (the trunk runs once, never per epoch):

- ``fit_translators_lstsq``: the affine map from layer l's stream to the last layer's stream
  (before the final norm) by ridge least squares, in closed form (Din et al., "Jump to
  Conclusions", 2023); the ridge per layer is the one of ``RIDGES`` with the lowest validation
  PPL. Seconds, whatever the vocabulary.
- ``train_translators``: per layer, the cross-entropy of the true next token through the head,
  AdamW, early stopping on the geometric mean of the layers' validation PPLs
  (``training.loops.fit``); every step runs the d x V head forward and backward, so on a large
  vocabulary it costs far more than the least-squares fit it may start from.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..measure.layer_exits import ExitHeadFn, LayerStates, exit_curve
from ..stages.blocks import Translator
from ..stages.families import family_parts
from .loops import TrainConfig, TrainHistory, fit

#: Ridge strengths tried per layer, relative to the mean squared norm of the (bias-augmented) inputs.
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)


def translated_head(model, translators: dict) -> ExitHeadFn:
    """head(layer, states) through ``translators[layer]`` and the model's own norm + lm_head."""
    norm, lm_head = family_parts(model).final_norm, model.get_output_embeddings()
    return lambda layer, states: lm_head(norm(translators[layer](states)))


def new_translators(model, layers, rank: Optional[int] = None) -> nn.ModuleDict:
    """One identity ``Translator`` per layer (keys are the layer numbers as strings)."""
    weight = model.get_output_embeddings().weight
    return nn.ModuleDict(
        {str(layer): Translator(weight.shape[1], rank).to(device=weight.device, dtype=weight.dtype) for layer in layers}
    )


def train_translators(
    model,
    translators: nn.ModuleDict,
    train: LayerStates,
    validation: LayerStates,
    config: TrainConfig = TrainConfig(),
    batch_tokens: int = 256,
    progress: bool = True,
) -> TrainHistory:
    """Train ``translators`` (one per layer of ``train.layers``) on the collected states with
    the model frozen; returns the history (validation metric: geometric mean PPL over layers)."""
    if train.layers != validation.layers or sorted(int(k) for k in translators) != list(train.layers):
        raise ValueError(
            f"translators for layers {sorted(int(k) for k in translators)} need states of the same "
            f"layers; got train {list(train.layers)} and validation {list(validation.layers)}"
        )
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    norm, lm_head = family_parts(model).final_norm, model.get_output_embeddings()
    by_layer = {int(k): t for k, t in translators.items()}
    parameters = [p for t in translators.values() for p in t.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)

    def epoch_batches(epoch: int) -> list[dict]:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        order = torch.randperm(train.tokens, generator=generator)
        return [{"index": part} for part in order.split(batch_tokens)]

    def loss_fn(batch: dict) -> tuple[Tensor, int]:
        index = batch["index"].to(train.states.device)
        states, targets = train.states[index], train.targets[index]
        total = 0.0
        for i, layer in enumerate(train.layers):
            logits = lm_head(norm(by_layer[layer](states[:, i]))).float()
            total = total + nn.functional.cross_entropy(logits, targets)
        return total / len(train.layers), int(index.numel())

    def validate() -> float:
        curve = exit_curve(validation, translated_head(model, by_layer))
        return math.exp(sum(math.log(point.ppl) for point in curve) / len(curve))

    return fit(
        parameters,
        list(translators.values()),
        epoch_batches,
        loss_fn,
        validate,
        config,
        lm_head.weight.device,
        progress,
        desc="exit translators",
    )


@torch.no_grad()
def fit_translators_lstsq(
    model, translators: nn.ModuleDict, train: LayerStates, validation: LayerStates, ridges=RIDGES
) -> dict:
    """Set each full-rank translator to the ridge least-squares map from its layer's stream to the
    last layer's (``train.final_states``), the ridge chosen per layer on ``validation`` (lowest PPL
    through the shared head). Returns {layer: {"ridge", "validation_ppl"}} and the solve's seconds."""
    import time

    if train.final_states is None:
        raise ValueError(
            "least-squares translators need the last layer's states: collect_layer_states(..., keep_final=True)"
        )
    if train.layers != validation.layers or sorted(int(k) for k in translators) != list(train.layers):
        raise ValueError(
            f"translators for layers {sorted(int(k) for k in translators)} need states of the same "
            f"layers; got train {list(train.layers)} and validation {list(validation.layers)}"
        )
    started = time.perf_counter()
    target = train.final_states.double()
    chosen = {}
    for i, layer in enumerate(train.layers):
        translator = translators[str(layer)]
        if translator.down is not None:
            raise ValueError(
                f"the least-squares fit needs full-rank translators; layer {layer}'s has rank {translator.rank}"
            )
        inputs = train.states[:, i].double()
        augmented = torch.cat([inputs, torch.ones_like(inputs[:, :1])], dim=1)  # (N, d + 1)
        gram, moment = augmented.T @ augmented, augmented.T @ target
        scale = float(gram.diagonal().mean())
        best = None
        for ridge in ridges:
            identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            solution = torch.linalg.solve(gram + ridge * scale * identity, moment)
            weight = solution[:-1].T - identity[:-1, :-1]  # h + W h + b
            translator.linear.weight.copy_(weight.to(translator.linear.weight.dtype))
            translator.linear.bias.copy_(solution[-1].to(translator.linear.bias.dtype))
            ppl = exit_curve(_one_layer(validation, i), translated_head(model, {layer: translator}))[0].ppl
            if best is None or ppl < best[1]:
                best = (ridge, ppl, {k: v.clone() for k, v in translator.state_dict().items()})
        translator.load_state_dict(best[2])
        chosen[layer] = {"ridge": best[0], "validation_ppl": best[1]}
    return {"layers": chosen, "seconds": time.perf_counter() - started, "ridges_tried": list(ridges)}


def _one_layer(states: LayerStates, index: int) -> LayerStates:
    from dataclasses import replace

    return replace(
        states, layers=(states.layers[index],), states=states.states[:, index : index + 1], final_states=None
    )
