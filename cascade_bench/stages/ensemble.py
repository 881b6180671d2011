"""Ensemble: an ordered list of stages that it validates; routing lives in ``routing/passes.py``."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .blocks import Block, cut_into_blocks
from .exits import ExitRule
from .llm import LLM, check_threshold
from .stage import Stage

#: The two kinds of stage (docs/design.md section 1): a whole causal LM, or a block of one model's layers.
STAGE_TYPES = (LLM, Block)


class Ensemble(nn.Module):
    """Ordered cascade stages. Stage 0 reads token ids; stage k>0 reads stage k-1's output state
    (an LLM's final hidden states, a Block's residual stream).

    Validates that consecutive stages agree on vocabulary size, hidden size, device and dtype.
    Owns no embedding of its own.
    """

    def __init__(self, stages: Sequence["Stage"] = ()):
        super().__init__()
        self.stages = nn.ModuleList()
        for stage in stages:
            self.add_stage(stage)
        self.eval()  # inference by default; training functions switch the stages they train

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __getitem__(self, index: int) -> "Stage":
        return self.stages[index]

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_blocks(
        cls,
        model: nn.Module,
        boundaries: Sequence[int],
        exit_rule: "str | Callable | ExitRule" = "max_prob",
        thresholds: Optional[Sequence[float]] = None,
        heads: str = "shared",
        translator_rank: Optional[int] = None,
    ) -> "Ensemble":
        """Early exit inside one pretrained causal LM: its layers cut before each index in
        ``boundaries`` (``[4, 8]`` on 12 layers: blocks of 4/4/4), weights shared with ``model``.
        Non-last blocks exit through the model's final norm + lm_head (``heads="shared"``) or a
        trainable copy each (``heads="own"``) or a trainable translator in front of the shared ones
        (``heads="translator"``, of ``translator_rank``). See ``blocks.cut_into_blocks``."""
        return cls(
            cut_into_blocks(
                model,
                boundaries,
                exit_rule=exit_rule,
                thresholds=thresholds,
                heads=heads,
                translator_rank=translator_rank,
            )
        )

    def add_stage(
        self,
        stage: "Stage | nn.Module",
        exit_rule: "str | Callable | ExitRule | None" = None,
        threshold: Optional[float] = None,
    ) -> "Stage":
        """Append a stage (an LLM or a Block, or a Hugging Face causal LM that gets wrapped as an
        LLM) and return it.

        ``exit_rule`` / ``threshold`` override the stage's own; for a raw model they default to
        ``"max_prob"`` and ``+inf``.
        """
        if not isinstance(stage, STAGE_TYPES):
            stage = LLM(
                stage,
                exit_rule=exit_rule if exit_rule is not None else "max_prob",
                threshold=threshold if threshold is not None else math.inf,
            )
        else:
            if exit_rule is not None:
                stage = _with_exit_rule(stage, exit_rule)
            if threshold is not None:
                stage.threshold = check_threshold(threshold)
        if len(self.stages):
            _check_compatible(len(self.stages) - 1, self.stages[-1], stage)
        self.stages.append(stage)
        return stage

    #: The name this method had before a stage could be a Block too; kept for existing code.

    def extend(self, num_new_layers: int, exit_rule: "str | Callable | ExitRule | None" = None) -> "Stage":
        """Append a freshly initialised stage of ``num_new_layers`` layers built from the last stage's config.

        After an LLM: a new LLM (its own embedding-free input path, norm and lm_head). After a Block:
        a Block of new layers reading the residual stream, with a trainable copy of the last block's
        exit head. The new stage is on the last stage's device and dtype and inherits its exit
        function unless ``exit_rule`` is given. Weights come from ``from_config`` (torch's current RNG).
        """
        if isinstance(num_new_layers, bool) or not isinstance(num_new_layers, int) or num_new_layers < 1:
            raise ValueError(f"num_new_layers must be a positive int, got {num_new_layers!r}")
        if not len(self.stages):
            raise ValueError("extend needs at least one stage to copy the config from; use add_stage first")
        last = self.stages[-1]
        return self.add_stage(
            last.new_stage_after(num_new_layers, exit_rule if exit_rule is not None else last.exit_rule)
        )

    # -- reading --------------------------------------------------------------------------------
    @property
    def thresholds(self) -> tuple[float, ...]:
        """Per-stage thresholds (the last stage's is ignored: it always exits)."""
        return tuple(stage.threshold for stage in self.stages)

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Set the thresholds of stages 0..S-2 (S-1 values) or of every stage (S values)."""
        thresholds = list(thresholds)
        if len(thresholds) not in (len(self) - 1, len(self)):
            raise ValueError(
                f"expected {len(self) - 1} or {len(self)} thresholds for {len(self)} stages, got {len(thresholds)}"
            )
        for stage, value in zip(self.stages, thresholds):
            stage.threshold = check_threshold(value)

    @property
    def layers_per_stage(self) -> tuple[int, ...]:
        return tuple(stage.num_layers for stage in self.stages)

    @property
    def vocab_size(self) -> int:
        return self.stages[0].vocab_size

    @property
    def device(self) -> torch.device:
        return self.stages[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.stages[0].dtype

    def validate(self) -> None:
        """Check every pair of consecutive stages (raises ValueError naming both values)."""
        if not len(self.stages):
            raise ValueError("the Ensemble has no stages; add one with add_stage")
        for k in range(1, len(self.stages)):
            _check_compatible(k - 1, self.stages[k - 1], self.stages[k])


def _with_exit_rule(llm: LLM, exit_rule) -> LLM:
    llm.exit_rule = exit_rule
    return llm


def _check_compatible(index: int, previous: LLM, new: LLM) -> None:
    pairs = (
        ("vocab size", previous.vocab_size, new.vocab_size),
        ("hidden size", previous.hidden_size, new.hidden_size),
        ("device", previous.device, new.device),
        ("dtype", previous.dtype, new.dtype),
    )
    for what, before, after in pairs:
        if before != after:
            raise ValueError(
                f"stage {index + 1} does not fit after stage {index}: {what} {after} != {before} "
                f"(stage {index} has {what} {before}, the new stage has {after})"
            )


@contextmanager
def evaluation_mode(module: nn.Module):
    """Every submodule in eval mode inside the block; each one's own mode restored after it."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
