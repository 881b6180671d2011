"""Trainable exits of a frozen model that read more than one position or more than an affine map.

Both start as exactly the ``Translator`` they wrap (their added branch's last weight is zero), so
a recipe that trains them starts from the translator's predictions and early stopping can keep
them if training does not help.

- ``MLPExit`` (EE-Tuning's MLP exit): the translated stream plus a residual two-layer MLP of it.
- ``AttentionAdapter`` (Kangaroo's adapter): one attention sub-layer (norm + self-attention, no
  MLP), a copy of the model's own layer right after the cut, reads the residual stream of the whole
  window (causally); its output goes through the translator. It needs the sequence: it runs on
  (rows, length, d) states with their attention mask.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from .blocks import Block, ExitHead, Translator
from .families import family_parts

#: Where a decoder layer keeps its attention, its MLP and the attention's output projection.
_ATTENTION_NAMES = ("self_attn", "attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward")
_OUTPUT_NAMES = ("o_proj", "c_proj", "out_proj", "dense")


class MLPExit(nn.Module):
    """``u = translator(h)``, then ``u + W2 gelu(W1 LayerNorm(u))`` with W2 zero at the start."""

    def __init__(self, translator: Translator, hidden: int):
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"MLP exit hidden width must be a positive int, got {hidden!r}")
        size = translator.linear.out_features
        self.translator = translator
        self.norm = nn.LayerNorm(size)
        self.up = nn.Linear(size, hidden)
        self.down = nn.Linear(hidden, size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        weight = translator.linear.weight
        for module in (self.norm, self.up, self.down):
            module.to(device=weight.device, dtype=weight.dtype)

    def forward(self, hidden: Tensor) -> Tensor:
        translated = self.translator(hidden)
        return translated + self.down(nn.functional.gelu(self.up(self.norm(translated))))

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds per token: the translator's, then the MLP's two matrices."""
        return self.translator.macs_per_token + 2 * self.up.in_features * self.up.out_features


class _NoMLP(nn.Module):
    """Stands in for a copied layer's MLP: adds nothing to the residual stream."""

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.zeros_like(hidden)


def _child(module: nn.Module, names: tuple[str, ...], what: str, owner: str) -> tuple[str, nn.Module]:
    for name in names:
        if isinstance(getattr(module, name, None), nn.Module):
            return name, getattr(module, name)
    raise ValueError(f"{owner} has no {what} named any of {list(names)}; the attention adapter cannot copy it")


class AttentionAdapter(nn.Module):
    """Norm + self-attention copied from ``model``'s layer ``layer`` (the one after the cut), its
    output projection zeroed, its MLP removed; then ``translator``. Call with (rows, length, d)
    residual states and their (rows, length) attention mask."""

    def __init__(self, model: nn.Module, layer: int, translator: Translator):
        super().__init__()
        layers = family_parts(model).layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
            raise ValueError(f"adapter layer must be an int in [0, {len(layers)}), got {layer!r}")
        copied = copy.deepcopy(layers[layer])
        owner = f"{type(copied).__name__} (layer {layer})"
        _, attention = _child(copied, _ATTENTION_NAMES, "attention", owner)
        _, output = _child(attention, _OUTPUT_NAMES, "output projection", type(attention).__name__)
        mlp_name, _ = _child(copied, _MLP_NAMES, "MLP", owner)
        setattr(copied, mlp_name, _NoMLP())
        with torch.no_grad():
            output.weight.zero_()
            if getattr(output, "bias", None) is not None:
                output.bias.zero_()
        parts = family_parts(model)
        runner = Block(model, layer, layer + 1, ExitHead(parts.final_norm, model.get_output_embeddings()), False)
        runner.layers = nn.ModuleList([copied])
        object.__setattr__(self, "runner", runner)  # runs the copy; its shared head is not this module's
        self.layer = copied
        self.translator = translator
        self._train_only_what_is_used()

    def _train_only_what_is_used(self) -> None:
        """Trainable: the parameters a forward pass reaches (the copy's MLP-side norms feed the
        removed MLP and are frozen, so the parameter count is what trains)."""
        for parameter in self.parameters():
            parameter.requires_grad_(True)
        weight = self.translator.linear.weight
        probe = torch.zeros(1, 2, weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.enable_grad():  # built under no_grad too
            self(probe, torch.ones(1, 2, dtype=torch.long, device=weight.device)).float().pow(2).sum().backward()
        for parameter in self.parameters():
            used = parameter.grad is not None
            parameter.grad = None
            parameter.requires_grad_(used)

    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        return self.translator(self.runner(inputs_embeds=hidden, attention_mask=attention_mask).hidden)


__all__ = ["AttentionAdapter", "MLPExit"]
