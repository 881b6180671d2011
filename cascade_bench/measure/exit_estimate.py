"""An estimate, from cached states, of what routed early exit at one cut would give.

At cut ``layer`` every token runs the first ``layer`` layers and the exit head; a token whose exit
confidence (max softmax probability) reaches the threshold keeps the exit's prediction, the others
run the remaining layers and keep the full-depth prediction. From per-token confidences and NLLs
this gives the exit ratio, the PPL and an analytic FLOP ratio to full depth.

It is an estimate, and the record says so: a token that does not exit gets the unsplit model's
prediction, computed with every earlier token's deeper states present. The physical cascade
(``cascade-bench run``) decides what exited tokens leave behind for later layers (its KV policies),
so its PPL at the same threshold can be higher; its FLOPs are counted, not estimated.

The threshold is calibrated on one split (the lowest that keeps PPL within ``tolerance`` of full
depth there) and applied to another.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from ..stages.families import layer_shape
from .analytic import attention_macs, dense_macs_per_token
from .layer_exits import LayerStates

#: What every estimate record carries.
ESTIMATE_NOTE = (
    "estimate from cached states (not the physical cascade): a token that does not exit gets the unsplit "
    "model's full-depth prediction; FLOPs analytic (layers, exit and head multiply-adds; attention counted full)"
)


@dataclass(frozen=True)
class TokenExits:
    """Per scored token at one cut: exit confidence, exit NLL and full-depth NLL (float64)."""

    confidence: Tensor
    exit_nll: Tensor
    full_nll: Tensor

    @property
    def full_ppl(self) -> float:
        return math.exp(float(self.full_nll.mean()))


@torch.inference_mode()
def token_exits(states: LayerStates, layer: int, head: Callable[[Tensor], Tensor], chunk: int = 512) -> TokenExits:
    """``head`` (hidden -> logits) on the states of ``layer``, per token."""
    index = states.layers.index(layer)
    confidence, nll = [], []
    for start in range(0, states.tokens, chunk):
        log_probs = head(states.states[start : start + chunk, index]).float().log_softmax(-1)
        confidence.append(log_probs.max(-1).values.exp().double())
        nll.append(-log_probs.gather(-1, states.targets[start : start + chunk, None])[:, 0].double())
    return TokenExits(torch.cat(confidence), torch.cat(nll), states.final_nll.double())


@dataclass(frozen=True)
class ExitCosts:
    """Multiply-adds per token: one decoder layer, the exit's own layers before the head, the head."""

    layer: int
    exit_extra: int
    head: int
    num_layers: int

    def ratio(self, cut: int, exit_ratio: float) -> float:
        """Mean cost per token over full depth's, with ``exit_ratio`` of the tokens leaving at ``cut``."""
        full = self.num_layers * self.layer + self.head
        spent = (
            cut * self.layer
            + self.exit_extra
            + self.head
            + (1.0 - exit_ratio) * ((self.num_layers - cut) * self.layer + self.head)
        )
        return spent / full


def exit_costs(config, window: int, exit_extra: int, vocab_size: int) -> ExitCosts:
    """Costs of one token of a ``window``-token window under the analytic model (``measure.analytic``)."""
    shape = layer_shape(config)
    per_layer = dense_macs_per_token(shape) + attention_macs(shape, 1, window) // window
    return ExitCosts(per_layer, int(exit_extra), shape.hidden_size * vocab_size, int(config.num_hidden_layers))


@dataclass(frozen=True)
class ExitEstimate:
    layer: int
    threshold: float
    exit_ratio: float
    ppl: float
    full_ppl: float
    flop_ratio: float
    note: str = ESTIMATE_NOTE

    def as_dict(self) -> dict:
        return asdict(self)


def at_threshold(tokens: TokenExits, threshold: float, layer: int, costs: ExitCosts) -> ExitEstimate:
    exits = tokens.confidence >= threshold
    nll = torch.where(exits, tokens.exit_nll, tokens.full_nll)
    ratio = float(exits.double().mean())
    return ExitEstimate(
        layer=layer,
        threshold=float(threshold),
        exit_ratio=ratio,
        ppl=math.exp(float(nll.mean())),
        full_ppl=tokens.full_ppl,
        flop_ratio=costs.ratio(layer, ratio),
    )


def calibrated_threshold(tokens: TokenExits, tolerance: float) -> float:
    """The lowest threshold (most exits) among the tokens' own confidences whose PPL stays within
    ``tolerance`` (0.05 = 5%) of full depth; above every confidence (nothing exits) when none does."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    order = torch.argsort(tokens.confidence, descending=True)
    # exiting the k most confident tokens: NLL sum = full sum + cumulative (exit - full) over them
    delta = (tokens.exit_nll - tokens.full_nll)[order].cumsum(0)
    mean_nll = (tokens.full_nll.sum() + delta) / tokens.full_nll.numel()
    allowed = mean_nll <= math.log1p(tolerance) + float(tokens.full_nll.mean())
    sorted_confidence = tokens.confidence[order]
    # a threshold exits every token at or above it: only cut where the next confidence is lower
    distinct = torch.ones_like(allowed)
    distinct[:-1] = sorted_confidence[1:] < sorted_confidence[:-1]
    ok = torch.nonzero(allowed & distinct).flatten()
    if ok.numel() == 0:
        return math.inf
    return float(sorted_confidence[int(ok.max())])


__all__ = [
    "ESTIMATE_NOTE",
    "ExitCosts",
    "ExitEstimate",
    "TokenExits",
    "at_threshold",
    "calibrated_threshold",
    "exit_costs",
    "token_exits",
]
