"""Where could a pretrained model exit? Per candidate layer, how well its residual stream predicts
through an exit head, and how many layers a token needs for the full-depth prediction.

``collect_layer_states`` runs the unsplit model once (no early exit) and keeps, for every scored
position, the residual stream after each candidate layer, the target and the full-depth argmax and
NLL. ``exit_curve`` puts one exit head per layer on those states (the model's own final norm +
lm_head, or trained ones) and returns per layer: PPL, top-1 accuracy, agreement with the full-depth
argmax, and each token's argmax. ``layers_needed`` turns the argmaxes into the oracle figures
(LayerSkip's "a token needs 23.45 of Llama2-7B's 32 layers"):

- first agreement: the first candidate layer whose prediction equals the full-depth one (what an
  oracle exit at the candidate layers would spend); a token no candidate agrees on needs all layers;
- settled: the first candidate layer from which every later candidate agrees too (no later layer
  changes the prediction).

Both are over the candidate grid, so a coarse grid overstates them; the report names the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..stages.families import family_parts

IGNORE_INDEX = -100


@dataclass
class LayerStates:
    """Scored positions of some batches, seen by the unsplit model.

    layers: candidate exit layers (a state "after layer l" is the input of layer l; 1 <= l < L).
    states: (N, len(layers), d) residual stream after each candidate layer (the model's dtype).
    targets: (N,) next-token ids. final_argmax: (N,) full-depth predictions. final_nll: (N,) float64.
    final_states: (N, d) residual stream after the last layer, before the final norm (what a
    translator is fitted to reproduce), when asked for.
    """

    layers: tuple[int, ...]
    num_layers: int
    states: Tensor
    targets: Tensor
    final_argmax: Tensor
    final_nll: Tensor
    final_states: Optional[Tensor] = None

    @property
    def tokens(self) -> int:
        return int(self.targets.numel())

    @property
    def final_ppl(self) -> float:
        return math.exp(float(self.final_nll.mean()))


def check_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Candidate exit layers as a sorted tuple; ValueError unless each is in [1, num_layers)."""
    chosen = tuple(sorted(set(int(x) for x in layers)))
    if not chosen or any(not 1 <= x < num_layers for x in chosen):
        raise ValueError(
            f"candidate exit layers must be in [1, {num_layers}) for a model of {num_layers} layers, got {list(layers)}"
        )
    return chosen


@torch.inference_mode()
def collect_layer_states(
    model,
    batches: Sequence[dict],
    layers: Sequence[int],
    max_tokens: Optional[int] = None,
    chunk: int = 1024,
    keep_final: bool = False,
) -> LayerStates:
    """Run the unsplit causal LM ``model`` over ``batches`` (dicts with ``input_ids``, ``targets``
    (-100 = not scored), optional ``attention_mask``) and keep the scored positions' states after
    each of ``layers``, up to ``max_tokens`` of them (the first ones, in batch order); with
    ``keep_final``, also the last layer's output before the final norm."""
    parts = family_parts(model)
    num_layers = len(parts.layers)
    layers = check_layers(layers, num_layers)
    head = model.get_output_embeddings()
    kept = _Kept()
    hook = (
        parts.final_norm.register_forward_pre_hook(lambda module, args: kept.captured.__setitem__("x", args[0]))
        if keep_final
        else None
    )
    try:
        for batch in batches:
            if max_tokens is not None and kept.count >= max_tokens:
                break
            kept.add_batch(parts, head, batch, layers, max_tokens, chunk)
    finally:
        if hook is not None:
            hook.remove()
    if not kept.targets:
        raise ValueError("no scored positions in the batches")
    return LayerStates(
        layers=layers,
        num_layers=num_layers,
        states=torch.cat(kept.states),
        targets=torch.cat(kept.targets),
        final_argmax=torch.cat(kept.argmax),
        final_nll=torch.cat(kept.nll),
        final_states=torch.cat(kept.finals) if keep_final else None,
    )


@dataclass
class _Kept:
    """What ``collect_layer_states`` keeps, batch by batch."""

    states: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    argmax: list = field(default_factory=list)
    nll: list = field(default_factory=list)
    finals: list = field(default_factory=list)
    captured: dict = field(default_factory=dict)
    count: int = 0

    def add_batch(self, parts, head, batch: dict, layers, max_tokens: Optional[int], chunk: int) -> None:
        device = head.weight.device
        mask = batch.get("attention_mask")
        out = parts.base_model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=None if mask is None else mask.to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        scored = batch["targets"].to(device) != IGNORE_INDEX
        if max_tokens is not None:  # keep the first scored positions only
            order = scored.reshape(-1).cumsum(0).reshape(scored.shape)
            scored &= order <= max_tokens - self.count
        self.states.append(torch.stack([out.hidden_states[layer][scored] for layer in layers], dim=1))
        target = batch["targets"].to(device)[scored]
        final = out.last_hidden_state[scored]
        for start in range(0, final.shape[0], chunk):
            logits = head(final[start : start + chunk]).float()
            self.argmax.append(logits.argmax(dim=-1))
            self.nll.append(
                torch.nn.functional.cross_entropy(logits, target[start : start + chunk], reduction="none").double()
            )
        self.targets.append(target)
        if "x" in self.captured:
            self.finals.append(self.captured.pop("x")[scored])
        self.count += int(scored.sum())


@dataclass(frozen=True)
class LayerExit:
    """One candidate layer through one exit head."""

    layer: int
    ppl: float
    accuracy: float
    agreement: float  # top-1 equal to the full-depth prediction
    argmax: Tensor = field(repr=False, compare=False)


#: head(layer, states (n, d)) -> logits (n, V)
ExitHeadFn = Callable[[int, Tensor], Tensor]


@torch.inference_mode()
def exit_curve(states: LayerStates, head: ExitHeadFn, chunk: int = 512) -> list[LayerExit]:
    """Per candidate layer: PPL, accuracy and agreement of ``head`` on the collected states."""
    curve = []
    for index, layer in enumerate(states.layers):
        nll, predictions = 0.0, []
        for start in range(0, states.tokens, chunk):
            logits = head(layer, states.states[start : start + chunk, index]).float()
            nll += float(
                torch.nn.functional.cross_entropy(logits, states.targets[start : start + chunk], reduction="sum")
            )
            predictions.append(logits.argmax(dim=-1))
        argmax = torch.cat(predictions)
        curve.append(
            LayerExit(
                layer=layer,
                ppl=math.exp(nll / states.tokens),
                accuracy=float((argmax == states.targets).float().mean()),
                agreement=float((argmax == states.final_argmax).float().mean()),
                argmax=argmax,
            )
        )
    return curve


@dataclass(frozen=True)
class LayersNeeded:
    """Mean layers a token needs for the full-depth prediction, over a candidate grid."""

    first_agreement: float
    settled: float
    grid: tuple[int, ...]
    num_layers: int


def layers_needed(curve: Sequence[LayerExit], final_argmax: Tensor, num_layers: int) -> LayersNeeded:
    """The oracle figures of the module docstring from one ``exit_curve``."""
    grid = tuple(point.layer for point in curve)
    agree = torch.stack([point.argmax == final_argmax for point in curve], dim=1)  # (N, G)
    depth = torch.tensor(grid + (num_layers,), dtype=torch.float64, device=final_argmax.device)
    agree = torch.cat([agree, torch.ones_like(agree[:, :1])], dim=1)  # full depth always agrees
    first = depth[agree.int().argmax(dim=1)]
    # settled: after the last disagreeing candidate (all later ones agree)
    disagree = ~agree
    last_bad = torch.where(
        disagree.any(dim=1),
        disagree.shape[1] - 1 - disagree.flip(1).int().argmax(dim=1),
        torch.full((agree.shape[0],), -1, device=agree.device),
    )
    settled = depth[(last_bad + 1).clamp(max=len(grid))]
    return LayersNeeded(
        first_agreement=float(first.mean()), settled=float(settled.mean()), grid=grid, num_layers=num_layers
    )


def shared_head(model) -> ExitHeadFn:
    """The model's own final norm + lm_head at every layer (the "logit lens")."""
    parts = family_parts(model)
    head = model.get_output_embeddings()
    return lambda layer, states: head(parts.final_norm(states))
