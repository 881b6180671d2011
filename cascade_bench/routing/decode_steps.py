"""What every decoder shares (``generation``, ``speculative``, ``draft_verify``): the prompts' real
tokens, and where a verified round's accepted tokens end at an EOS."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def real_tokens(input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """(B, P) bool: the prompts' real tokens (all, without a mask); a prompt with none is refused."""
    if attention_mask is None:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        real = attention_mask.to(input_ids.device).bool()
    if not bool(real.any(dim=1).all()):
        raise ValueError("every prompt needs at least one real token (attention_mask row of zeros)")
    return real


def cut_after_eos(choice: Tensor, take: Tensor, eos: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    """The slots of a verified round each row takes (``take``, (n, width)) cut after its first ``eos``
    among them: (take, tokens gained per row, rows that finished). No ``eos``: nothing is cut."""
    if eos is None:
        return take, take.sum(dim=1), torch.zeros(take.shape[0], dtype=torch.bool, device=take.device)
    is_eos = (choice == eos) & take
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    take = take & (before == 0)
    return take, take.sum(dim=1), (is_eos & take).any(dim=1)
