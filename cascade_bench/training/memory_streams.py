"""Training a memory-layer model on long token streams: sequential order vs lagged chunk memories.

A stream is cut into consecutive chunks; a chunk's forward starts from the memories its
predecessor left (``MemoryLMForCausalLM(memory_state=...)``; memory writes are detached, so no
gradient crosses chunks either way). Streams are trained in groups of ``batch_size`` rows.

- ``"sequential"``: each group's chunks in stream order, chunk i starting from the memories chunk
  i-1 left in this same pass: every step waits for the one before it.
- ``"lagged-chunks"`` (lagged chunk memories: Lagged Cache Training's idea at the level of chunks, not
  its seed's per-position method, which ``training.lagged_cache`` has): steps over (group, chunk) pairs in
  shuffled order;
  chunk i starts from the memories its predecessor left the last time that one was trained (an
  epoch ago, or earlier in this one; empty before that), kept in a cache. No step needs another
  step of the same pass, so chunks batch and shuffle like independent windows; the price is
  memories computed with older weights.

Both see the same chunks and take the same number of steps per epoch; from the same weights and
the same starting memories their first steps are the same step. Validation streams every
validation stream's chunks in order with carried memories (every token sees its whole past).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .loops import EarlyStopping, train_epochs

TRAINING_ORDERS = ("sequential", "lagged-chunks")


def stream_chunks(stream: Tensor, streams: int, chunk_len: int, max_chunks: Optional[int] = None) -> Tensor:
    """(streams, chunks, chunk_len) ids: the 1-D token ``stream`` cut into ``streams`` contiguous
    pieces, each cut into consecutive chunks (at most ``max_chunks``); the remainder is dropped."""
    for name, value in (("streams", streams), ("chunk_len", chunk_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    chunks = stream.numel() // (streams * chunk_len)
    if max_chunks is not None:
        chunks = min(chunks, max_chunks)
    if chunks < 1:
        raise ValueError(
            f"a stream of {stream.numel()} tokens cannot make {streams} streams of chunks of {chunk_len} tokens"
        )
    return stream[: streams * chunks * chunk_len].view(streams, chunks, chunk_len)


def chunk_loss(model, ids: Tensor, memory_state: Optional[dict]) -> tuple[Tensor, Optional[dict]]:
    """Mean next-token cross-entropy inside chunk ``ids`` (R, T) from ``memory_state``; and the
    memories after it (detached)."""
    out = model(input_ids=ids, labels=ids, memory_state=memory_state)
    return out.loss, out.memory_state


@torch.no_grad()
def streamed_nll(model, chunks: Tensor, batch_size: int = 8) -> tuple[float, int]:
    """Summed NLL and scored tokens over (streams, chunks, T) ids, each stream's chunks in order
    with carried memories (the first token of each stream is not scored)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, chunks.shape[0], batch_size):
        group, state = chunks[start : start + batch_size], None
        for i in range(group.shape[1]):
            loss, state = chunk_loss(model, group[:, i], state)
            n = group.shape[0] * (group.shape[2] - 1)
            total, tokens = total + float(loss) * n, tokens + n
    model.train(was_training)
    return total, tokens


@dataclass
class StreamTraining:
    """What ``train_on_streams`` did: seconds and validation PPL per epoch, the best epoch, steps."""

    order: str
    epoch_seconds: list = field(default_factory=list)
    validation_ppl: list = field(default_factory=list)
    steps_per_epoch: int = 0
    best_epoch: int = 0
    stopped_by: str = ""

    @property
    def best_ppl(self) -> float:
        return self.validation_ppl[self.best_epoch - 1]

    @property
    def median_epoch_seconds(self) -> float:
        ordered = sorted(self.epoch_seconds)
        return ordered[len(ordered) // 2]


def _steps(order: str, groups: int, chunks: int, generator: torch.Generator) -> list[tuple[int, int]]:
    if order == "sequential":
        return [(g, i) for g in torch.randperm(groups, generator=generator).tolist() for i in range(chunks)]
    pairs = [(g, i) for g in range(groups) for i in range(chunks)]
    return [pairs[j] for j in torch.randperm(len(pairs), generator=generator).tolist()]


def train_on_streams(
    model,
    train: Tensor,
    validation: Tensor,
    order: str,
    batch_size: int = 8,
    lr: float = 1e-3,
    patience: int = 2,
    max_epochs: int = 30,
    seed: int = 0,
) -> StreamTraining:
    """Train ``model`` on (streams, chunks, T) ids in ``order`` (``TRAINING_ORDERS``) with AdamW until
    the streamed validation PPL has not improved for ``patience`` epochs (or ``max_epochs``); the best
    weights are restored."""
    if order not in TRAINING_ORDERS:
        raise ValueError(f"order must be one of {TRAINING_ORDERS}, got {order!r}")
    if train.dim() != 3 or validation.dim() != 3:
        raise ValueError(
            f"train and validation must be (streams, chunks, T) ids, got shapes "
            f"{tuple(train.shape)} and {tuple(validation.shape)}"
        )
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    groups = -(-train.shape[0] // batch_size)
    history = StreamTraining(order=order, steps_per_epoch=groups * train.shape[1])
    lagged: dict[tuple[int, int], dict] = {}
    stopping = EarlyStopping([model], patience)

    def epoch_steps(epoch: int):
        state = None  # sequential order: memories carried from chunk to chunk of one stream group

        def step(g: int, i: int):
            nonlocal state
            ids = train[g * batch_size : (g + 1) * batch_size, i]
            if order == "sequential":
                loss, state = chunk_loss(model, ids, None if i == 0 else state)
            else:
                loss, lagged[(g, i + 1)] = chunk_loss(model, ids, lagged.get((g, i)))
            return loss, ids.numel()

        for g, i in _steps(order, groups, train.shape[1], generator):
            yield lambda g=g, i=i: step(g, i)

    def validate(epoch: int, stats) -> float:
        history.epoch_seconds.append(stats.seconds)
        nll, tokens = streamed_nll(model, validation, batch_size)
        history.validation_ppl.append(math.exp(nll / tokens))
        return history.validation_ppl[-1]

    train_epochs([model], optimizer, range(1, max_epochs + 1), epoch_steps, validate, stopping)
    history.best_epoch, history.stopped_by = stopping.best_epoch, stopping.stop_reason
    return history
