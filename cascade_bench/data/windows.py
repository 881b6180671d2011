"""Token streams and windows.

A split becomes one token stream: its documents encoded and concatenated, each followed by the
EOS token (no padding of short texts). Streams are cut into

- training windows: non-overlapping, ``seq_len`` tokens, every position scored (its target is
  the next token of the stream, also across the window's end);
- evaluation windows: sliding, as in the Hugging Face perplexity guide: windows of
  ``context_len`` tokens every ``stride`` tokens, scoring only the predictions no earlier window
  made, so every token after the first is scored exactly once, with at least
  ``context_len - stride`` tokens of context. ``stride == context_len`` gives disjoint windows.
  Unlike the guide, a window's last position also predicts the token just past the window, so
  disjoint windows lose no token at their boundaries.

Batches are dicts with ``input_ids``, ``targets`` (the token to predict at each position,
-100 where not scored) and, where the last batch is ragged, ``attention_mask``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .batch import IGNORE_INDEX


def encode_documents(tokenizer, documents: Sequence[str]) -> Tensor:
    """One (N,) int64 stream: each document's ids followed by EOS."""
    if not documents:
        raise ValueError("cannot encode an empty split (no documents)")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(list(documents), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _check(seq_len: int, stream: Tensor, max_positions: Optional[int], what: str) -> None:
    if seq_len < 1:
        raise ValueError(f"{what} must be >= 1, got {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"{what} {seq_len} is longer than the model's max positions {max_positions}")
    if stream.numel() < 2:
        raise ValueError(f"a stream of {stream.numel()} tokens has nothing to predict")


def training_windows(
    stream: Tensor,
    seq_len: int,
    batch_size: int,
    max_positions: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> list[dict]:
    """Non-overlapping windows of ``seq_len`` tokens in batches; shuffled when a generator is given."""
    _check(seq_len, stream, max_positions, "seq_len")
    count = (stream.numel() - 1) // seq_len
    if count == 0:
        raise ValueError(f"the stream has {stream.numel()} tokens, fewer than one window of {seq_len} + 1")
    starts = torch.arange(count) * seq_len
    if generator is not None:
        starts = starts[torch.randperm(count, generator=generator)]
    offsets = torch.arange(seq_len)
    batches = []
    for chunk in starts.split(batch_size):
        index = chunk[:, None] + offsets
        batches.append({"input_ids": stream[index], "targets": stream[index + 1]})
    return batches


def sliding_windows(
    stream: Tensor, context_len: int, stride: int, batch_size: int, max_positions: Optional[int] = None
) -> list[dict]:
    """Evaluation windows (see module docstring), batched; the last batch may be ragged (masked)."""
    _check(context_len, stream, max_positions, "context_len")
    if not 1 <= stride <= context_len:
        raise ValueError(f"stride must be in [1, context_len={context_len}], got {stride}")
    n = stream.numel()
    windows = []  # (input ids, targets)
    scored_until = 1  # tokens < scored_until are scored (token 0 never is: nothing predicts it)
    begin = 0
    while scored_until < n:
        end = min(begin + context_len, n)
        ids = stream[begin:end]
        targets = torch.full_like(ids, IGNORE_INDEX)
        # position t predicts stream token begin + t + 1 (the last position predicts the token just
        # past the window); score it if no earlier window did and the stream has that token
        low = max(scored_until - begin - 1, 0)
        high = min(end - begin, n - begin - 1)
        targets[low:high] = stream[begin + low + 1 : begin + high + 1]
        windows.append((ids, targets))
        scored_until = begin + high + 1
        begin += stride
    batches = []
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        length = max(ids.numel() for ids, _ in group)
        input_ids = torch.zeros(len(group), length, dtype=torch.long)
        targets = torch.full((len(group), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(group), length, dtype=torch.long)
        for row, (ids, tgt) in enumerate(group):
            input_ids[row, : ids.numel()], targets[row, : ids.numel()], mask[row, : ids.numel()] = ids, tgt, 1
        batch = {"input_ids": input_ids, "targets": targets}
        if not bool(mask.all()):
            batch["attention_mask"] = mask
        batches.append(batch)
    return batches
