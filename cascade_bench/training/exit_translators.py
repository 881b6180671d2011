"""Fit one exit translator per candidate layer of a frozen pretrained model.

A ``Translator`` (``stages.blocks``) maps the residual stream after layer l so that the model's own
final norm + lm_head (frozen, shared) read it as they read the last layer's. The fit reads the
states ``measure.layer_exits.collect_layer_states`` kept (the trunk runs once, never per epoch):

- ``fit_translators_lstsq``: the affine map from layer l's stream to the last layer's stream
  (before the final norm) by ridge least squares, in closed form (Din et al., "Jump to
  Conclusions", 2023); the ridge per layer is the one of ``RIDGES`` with the lowest validation
  PPL. Seconds, whatever the vocabulary.
- the same translators trained further by KL to the full model's top-k distribution are the
  ``lstsq+kl`` recipe of ``exit_recipes`` (``translator_fit = "lstsq+kl"`` in a run).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..measure.layer_exits import ExitHeadFn, LayerStates, exit_curve
from ..stages.blocks import Translator
from ..stages.families import family_parts

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
