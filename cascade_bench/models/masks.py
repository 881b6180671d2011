"""Which of a call's new tokens are real, from whatever attention mask the call got."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def new_token_validity(attention_mask: Optional[Tensor], length: int) -> Optional[Tensor]:
    """(R, length) bool, True = a real token, for the last ``length`` tokens of a call; None when
    the mask says nothing (every token real).

    attention_mask: None; a 2-D (R, cached + length) padding mask (1 = real); or a finished 4-D
    (R, 1, length, cached + length) mask, bool (True = attend) or additive (0 = attend), where a
    new token is real iff it may attend to itself (the diagonal of the new-token block).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        return attention_mask[:, -length:].bool()
    if attention_mask.dim() != 4:
        raise ValueError(
            f"attention_mask must be 2-D (rows, keys) or 4-D (rows, 1, queries, keys), "
            f"got shape {tuple(attention_mask.shape)}"
        )
    block = attention_mask[:, 0, -length:, -length:]
    diagonal = torch.diagonal(block, dim1=-2, dim2=-1)
    return diagonal if diagonal.dtype == torch.bool else diagonal == 0
