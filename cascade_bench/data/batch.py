"""Teacher-forced token batches: which tokens are real, their targets and original positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenBatch:
    """A validated (B, T) batch, flattened once.

    tokens: (N,) sorted flat indices of real tokens (attention_mask == 1), row-major.
    ids: (B*T,) token ids. targets: (B*T,) id of the token to predict, IGNORE_INDEX where none.
    positions: (B*T,) original position of each token among its sequence's real tokens.
    """

    batch_size: int
    seq_len: int
    tokens: Tensor
    ids: Tensor
    targets: Tensor
    positions: Tensor


def next_token_targets(input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Target of each position = the next real token of the same sequence; IGNORE_INDEX where none.

    Works for right padding, left padding and holes alike. input_ids, attention_mask: (B, T).
    """
    batch_size, seq_len = input_ids.shape
    ids = input_ids.reshape(-1)
    targets = torch.full_like(ids, IGNORE_INDEX)
    if attention_mask is None:
        targets.view(batch_size, seq_len)[:, :-1] = input_ids[:, 1:]
        return targets.view(batch_size, seq_len)
    real = attention_mask.reshape(-1).bool().nonzero().squeeze(1)
    same_row = torch.div(real[1:], seq_len, rounding_mode="floor") == torch.div(
        real[:-1], seq_len, rounding_mode="floor"
    )
    targets[real[:-1][same_row]] = ids[real[1:][same_row]]
    return targets.view(batch_size, seq_len)


def make_token_batch(
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    targets: Optional[Tensor] = None,
    vocab_size: Optional[int] = None,
    device: "torch.device | str | None" = None,
) -> TokenBatch:
    """Validate, move to ``device`` and flatten a batch.

    targets (B, T), if given, are already shifted (target of position t).
    """
    for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask), ("targets", targets)):
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, T), got {type(value).__name__}")
    if device is not None:
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        targets = None if targets is None else targets.to(device)
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"input_ids must be an integer tensor of shape (B, T), got dtype {input_ids.dtype} "
            f"and shape {tuple(input_ids.shape)}"
        )
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); expected at least one token")
    input_ids = input_ids.long()
    for name, other in (("attention_mask", attention_mask), ("targets", targets)):
        if other is not None and tuple(other.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(other.shape)}"
            )
    if vocab_size is not None:
        low, high = torch.stack([input_ids.min(), input_ids.max()]).tolist()
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {vocab_size}) for a vocabulary of {vocab_size}, "
                f"got ids from {low} to {high}"
            )
    batch_size, seq_len = input_ids.shape
    if attention_mask is not None and bool(attention_mask.bool().all()):
        attention_mask = None
    if attention_mask is None:
        tokens = torch.arange(input_ids.numel(), device=input_ids.device)
        positions = torch.arange(seq_len, device=input_ids.device).repeat(batch_size)
    else:
        real = attention_mask.bool()
        tokens = real.reshape(-1).nonzero().squeeze(1)
        positions = (torch.cumsum(real.long(), dim=1) - 1).clamp(min=0).reshape(-1)
        if tokens.numel() == 0:
            raise ValueError("attention_mask marks no token as real; expected at least one 1")
    if targets is None:
        targets = next_token_targets(input_ids, attention_mask)
    return TokenBatch(
        batch_size=batch_size,
        seq_len=seq_len,
        tokens=tokens,
        ids=input_ids.reshape(-1),
        targets=targets.long().reshape(-1),
        positions=positions,
    )


def unpack_batch(item) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(input_ids, attention_mask, targets) from a dataloader item: a (B, T) tensor, a tuple
    (input_ids[, attention_mask[, targets]]) or a dict with those keys."""
    if isinstance(item, Tensor):
        return item, None, None
    if isinstance(item, dict):
        if "input_ids" not in item:
            raise ValueError(f"a batch dict needs an 'input_ids' key, got keys {sorted(item)}")
        return item["input_ids"], item.get("attention_mask"), item.get("targets")
    if isinstance(item, (tuple, list)) and 1 <= len(item) <= 3:
        padded = list(item) + [None] * (3 - len(item))
        return padded[0], padded[1], padded[2]
    raise TypeError(
        f"a batch must be a (B, T) tensor, a tuple (input_ids, attention_mask, targets) or a dict, "
        f"got {type(item).__name__}"
    )


def most_frequent_ids(batches: Iterable, vocab_size: int, count: int) -> Tensor:
    """The ``count`` most frequent token ids over the real tokens of ``batches`` (ties: lower id
    first), as a (count,) int64 tensor: the candidate vocabulary of a cheap max-prob head."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= vocab_size:
        raise ValueError(f"count must be an int in [1, {vocab_size}], got {count!r}")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for item in batches:
        ids, mask, _ = unpack_batch(item)
        real = ids if mask is None else ids[mask.bool()]
        counts += torch.bincount(real.flatten().cpu().long(), minlength=vocab_size)[:vocab_size]
    order = sorted(range(vocab_size), key=lambda i: (-int(counts[i]), i))
    return torch.tensor(order[:count], dtype=torch.long)
