"""Low-rank adapters (LoRA, Hu et al. 2021) on a model's linear layers, added and removed in place.

``add_lora`` wraps every ``nn.Linear`` whose attribute name is in ``targets`` in a ``LoRALinear``:
``base(x) + (alpha / rank) * B A x`` with ``B`` zero at the start, so the wrapped model computes
exactly what it computed before until ``B`` is trained. The base weights are never changed
(they are frozen and shared); ``remove_lora`` puts the original modules back.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

#: Linear layers of Llama-style decoder layers (attention and MLP projections).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """``base`` (frozen) plus a rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if (
            isinstance(rank, bool)
            or not isinstance(rank, int)
            or not 1 <= rank <= min(base.in_features, base.out_features)
        ):
            raise ValueError(
                f"LoRA rank must be an int in [1, {min(base.in_features, base.out_features)}], got {rank!r}"
            )
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False).to(base.weight.device, base.weight.dtype)
        self.up = nn.Linear(rank, base.out_features, bias=False).to(base.weight.device, base.weight.dtype)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = float(alpha) / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale


def _matching(model: nn.Module, targets: Sequence[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, linear layer) for every ``nn.Linear`` of ``model`` named in ``targets``."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in targets and isinstance(child, nn.Linear)
    ]


def lora_targets(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> int:
    """How many linear layers of ``model`` ``add_lora`` would wrap."""
    return len(_matching(model, targets))


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS) -> list[LoRALinear]:
    """Wrap the matching linear layers of ``model`` in place (every parameter of ``model`` frozen,
    the adapters' trainable); ValueError when nothing matches."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    found = _matching(model, targets)
    if not found:
        raise ValueError(f"no linear layer of {type(model).__name__} is named any of {list(targets)}")
    adapters = []
    for parent, name, child in found:
        adapter = LoRALinear(child, rank, alpha)
        setattr(parent, name, adapter)
        adapters.append(adapter)
    return adapters


def lora_parameters(adapters: Sequence[LoRALinear]) -> list[nn.Parameter]:
    return [p for adapter in adapters for p in (adapter.down.weight, adapter.up.weight)]


def remove_lora(model: nn.Module) -> int:
    """Put every wrapped layer's base module back; returns how many were removed."""
    found = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, LoRALinear)
    ]
    for parent, name, child in found:
        setattr(parent, name, child.base)
    return len(found)


@torch.no_grad()
def lora_norm(adapters: Sequence[LoRALinear]) -> float:
    """Frobenius norm of all updates ``scale * B A`` together (0 before training)."""
    return math.sqrt(sum(float(((a.up.weight @ a.down.weight) * a.scale).pow(2).sum()) for a in adapters))


__all__ = ["DEFAULT_TARGETS", "LoRALinear", "add_lora", "lora_norm", "lora_parameters", "lora_targets", "remove_lora"]
