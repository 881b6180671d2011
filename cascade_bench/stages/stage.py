"""What a cascade stage is: the ``Stage`` protocol every stage implements (``LLM``: a whole causal
LM, of any family ours included, memory layers too; ``Block``: a slice of a pretrained model's
layers), and ``StageBase``, the members both compute the same way from their config and exit head.

The routed pass, the cost model, training, persistence and generation use only these members, so
a new kind of stage needs exactly them (``tests/stages/test_stage_protocol.py`` checks both kinds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .exits import ExitRule, HoldsExitRule


@dataclass
class StageOutput:
    """What one stage returns for a (R, L) batch.

    hidden: (R, L, d) the state the next stage reads as ``inputs_embeds`` and ``stage.logits`` turns
        into logits: an LLM's final hidden states after its final norm (``hidden_states[-1]``), a
        Block's residual stream (its exit head applies the norm).
    input_state: (R, L, d) input of the stage's last decoder layer, or None if not captured.
    logits: (n, V) logits at the positions asked for (``logits_at``), in row-major order, or None.
    cache: the extended key/value cache when the call used one, else None.
    """

    hidden: Tensor
    input_state: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    cache: object = None


@runtime_checkable
class Stage(Protocol):
    """A cascade stage. ``forward`` runs the stage's layers on token ids (the first stage) or hidden
    states (R, L, d) and returns a ``StageOutput``; ``logits`` applies its exit head; a token that
    reaches it exits iff ``exit_rule(h_in, h_out, logits) >= threshold``."""

    exit_rule: ExitRule
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

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        capture_input_state: bool = False,
        logits_at: Optional[Tensor] = None,
        cache=None,
        use_cache: bool = False,
    ) -> StageOutput:
        """Token ids (R, L) (the first stage) or hidden states (R, L, d); ``capture_input_state``:
        keep the input of the last layer (cos_sim reads it); ``logits_at``: a bool (R, L) mask of the
        positions whose logits to return; ``cache``/``use_cache``: extend a key/value cache."""
        ...

    def logits(self, hidden: Tensor) -> Tensor: ...

    def new_stage_after(self, num_layers: int, exit_rule) -> "Stage": ...


class StageBase(HoldsExitRule):
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
