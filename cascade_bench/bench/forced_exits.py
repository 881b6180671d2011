"""Forced exit shares for decode benchmarks.

Untrained stages generate degenerate text, so thresholds calibrated on text give decode exit
ratios far from any target. The exit ratio after stage 0 is therefore forced by ``ForcedExitRate``,
an exit rule that pays the full cost of a real rule (``max_prob``: the stage's logits for every
token reaching it; ``cos_sim``: the last layer's input captured, no logits until a token exits)
and then decides by a seeded pattern that exits exactly the asked fraction. ``bench.decoding``
times every decoding variant with it; ``benchmarks/test_generation_speed.py`` records the same.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..stages.exits import ExitRule, resolve_exit_rule

#: Decisions are drawn in chunks of this many: each chunk exits exactly its share, in seeded order.
CHUNK = 8


class ForcedExitRate:
    """Exit rule that exits exactly ``rate`` of the tokens it sees, at the cost of ``rule``.

    Decisions come in chunks of ``CHUNK`` consecutive tokens (one decode step of batch 8, or 8
    steps of batch 1); chunk j exits round(rate * CHUNK * (j+1)) - round(rate * CHUNK * j) of
    its tokens, at seeded random places. ``rule``'s confidence is computed for every token and
    discarded, so the rule's cost is paid (its ``needs_logits``/``needs_input_state`` carry
    over). Returns 1.0 (exit) or 0.0 (continue): use it with threshold 0.5.
    """

    def __init__(self, rate: float, rule: "str | ExitRule" = "max_prob", seed: int = 0):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be a fraction in [0, 1], got {rate!r}")
        self.rate = float(rate)
        self.rule = resolve_exit_rule(rule)
        self.needs_logits = self.rule.needs_logits
        self.needs_input_state = self.rule.needs_input_state
        self.__name__ = f"forced {self.rate:g} ({self.rule.name} cost)"
        self._generator = torch.Generator().manual_seed(seed)
        self._pattern = torch.zeros(0)
        self._chunks = 0
        self._used = 0

    def _extend(self, needed: int, device) -> None:
        chunks = []
        while (len(chunks) + self._chunks) * CHUNK < needed:
            j = self._chunks + len(chunks)
            exits = round(self.rate * CHUNK * (j + 1)) - round(self.rate * CHUNK * j)
            chunk = torch.zeros(CHUNK)
            chunk[torch.randperm(CHUNK, generator=self._generator)[:exits]] = 1.0
            chunks.append(chunk)
        self._chunks += len(chunks)
        self._pattern = torch.cat([self._pattern.to(device), torch.cat(chunks).to(device)])

    def __call__(self, h_in: Optional[Tensor], h_out: Tensor, logits: Optional[Tensor]) -> Tensor:
        self.rule(h_in, h_out, logits)  # the real rule's cost, paid and discarded
        n = h_out.shape[0]
        end = self._used + n
        if end > self._pattern.numel() or self._pattern.device != h_out.device:
            self._extend(max(end, 2 * self._pattern.numel()), h_out.device)
        decisions = self._pattern[self._used : end]
        self._used = end
        return decisions
