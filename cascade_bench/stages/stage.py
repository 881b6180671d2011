"""What a cascade stage is: the ``Stage`` protocol every stage implements (``LLM``: a whole causal
LM, of any family ours included, memory layers too; ``Block``: a slice of a pretrained model's
layers), and ``StageBase``, the members both compute the same way from their config and exit head.

The routed pass, the cost model, training, persistence and generation use only these members, so
a new kind of stage needs exactly them (``tests/stages/test_stage_protocol.py`` checks both kinds).
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .exits import ExitFunction, HoldsExitFunction


@runtime_checkable
class Stage(Protocol):
    """A cascade stage. ``forward`` runs the stage's layers on token ids (the first stage) or hidden
    states (R, L, d) and returns a ``StageOutput``; ``logits`` applies its exit head; a token that
    reaches it exits iff ``exit_function(h_in, h_out, logits) >= threshold``."""

    exit_function: ExitFunction
    threshold: float

    @property
    def config(self): ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def max_positions(self) -> Optional[int]: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def lm_head(self) -> nn.Module: ...

    @property
    def head_macs_per_token(self) -> int: ...

    @property
    def layers(self) -> nn.ModuleList: ...

    def forward(self, *args, **kwargs): ...

    def logits(self, hidden: Tensor) -> Tensor: ...

    def new_stage_after(self, num_layers: int, exit_fn) -> "Stage": ...


class StageBase(HoldsExitFunction):
    """Members of ``Stage`` that every kind of stage computes alike: sizes from its ``config``
    (the layers it runs), where it lives and its precision from its ``lm_head``."""

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    @property
    def max_positions(self) -> Optional[int]:
        value = getattr(self.config, "max_position_embeddings", None)
        return int(value) if value is not None else None

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
