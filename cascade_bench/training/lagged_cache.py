"""Training the recurrent context model through its recurrence, or with Lagged Cache Training.

``models.recurrent_context.RecurrentContextLM`` updates one context vector per position from the
previous position's. Two ways to train it on windows of a token stream:

- ``"sequential"``: each window's contexts computed position after position in this pass (the
  recurrence, ``RecurrentContextLM.contexts``); the loss backpropagates through the whole window. A
  window's T updates wait for each other.
- ``"lagged-cache"`` (Lagged Cache Training, as its seed describes it): a cache holds, for every
  training window, each position's context from the last pass over that window (zeros before the
  first). A step updates all T positions at once, position t reading the cache at t-1 (position 0
  the initial context), so the gradient reaches one update deep, and writes the new contexts back.
  Pass after pass the cache approaches the recurrence's own contexts: a fixed-point iteration run
  in parallel over positions.

Both early-stop on the validation PPL of the recurrence itself (the contexts inference computes),
through the shared loop ``loops.fit``. ``training.memory_streams`` has the segment-level method
for the memory-layer models (lagged chunk memories), which is another thing.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .loops import TrainConfig, TrainHistory, fit, shuffled

RECURRENT_ORDERS = ("sequential", "lagged-cache")


def recurrent_windows(stream: Tensor, window: int, max_windows: Optional[int] = None) -> Tensor:
    """(N, window + 1) ids: consecutive disjoint pieces of the 1-D ``stream``; each predicts its last
    ``window`` tokens from the ones before (the remainder is dropped)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    count = (stream.numel() - 1) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise ValueError(f"a stream of {stream.numel()} tokens holds no window of {window} + 1 tokens")
    starts = torch.arange(count) * window
    return stream[starts.unsqueeze(1) + torch.arange(window + 1)]


def lagged_contexts(model, ids: Tensor, cached: Tensor) -> Tensor:
    """One Lagged Cache Training pass over (R, T) ``ids``: every position at once, position t from the
    cached context of position t - 1 (position 0 from the initial context). ``cached``: (R, T, hidden),
    the contexts of the last pass. Iterated T times from any cache, it gives the recurrence's contexts
    exactly (position t is exact after t + 1 passes)."""
    start = model.initial_context(ids.shape[0]).unsqueeze(1)
    return model.next_context(torch.cat([start, cached[:, :-1]], dim=1), ids)


@torch.no_grad()
def recurrent_nll(model, windows: Tensor, batch_size: int = 64) -> tuple[float, int]:
    """Summed NLL and scored tokens over (N, T + 1) windows, contexts computed by the recurrence."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for rows in windows.split(batch_size):
        logits = model.logits(model.contexts(rows[:, :-1]))
        total += float(
            torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].reshape(-1), reduction="sum")
        )
        count += rows[:, 1:].numel()
    model.train(was_training)
    return total, count


def train_recurrent(
    model,
    train: Tensor,
    validation: Tensor,
    order: str,
    config: TrainConfig = TrainConfig(),
    batch_size: int = 16,
    progress: bool = True,
) -> TrainHistory:
    """Train ``model`` on (N, T + 1) ``train`` windows in ``order`` (see module docstring), early
    stopping on the recurrence's PPL over ``validation`` windows."""
    if order not in RECURRENT_ORDERS:
        raise ValueError(f"order must be one of {list(RECURRENT_ORDERS)}, got {order!r}")
    if train.dim() != 2 or train.shape[1] < 2:
        raise ValueError(f"train must be (windows, T + 1) token ids with T >= 1, got shape {tuple(train.shape)}")
    device = model.embedding.weight.device
    train = train.to(device)
    cache = (
        torch.zeros(train.shape[0], train.shape[1] - 1, model.hidden_size, device=device)
        if order == "lagged-cache"
        else None
    )
    batches = [{"rows": rows} for rows in torch.arange(train.shape[0], device=device).split(batch_size)]

    def loss_fn(batch: dict) -> tuple[Tensor, int]:
        rows = batch["rows"]
        inputs, targets = train[rows, :-1], train[rows, 1:]
        if cache is None:
            contexts = model.contexts(inputs)
        else:
            contexts = lagged_contexts(model, inputs, cache[rows])
            cache[rows] = contexts.detach()
        logits = model.logits(contexts)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.reshape(-1)), targets.numel()

    def validate() -> float:
        total, count = recurrent_nll(model, validation.to(device))
        return math.exp(total / count)

    return fit(
        [p for p in model.parameters() if p.requires_grad],
        [model],
        shuffled(batches, config.seed),
        loss_fn,
        validate,
        config,
        device,
        progress,
        desc=f"recurrent {order}",
    )


__all__ = ["RECURRENT_ORDERS", "lagged_contexts", "recurrent_nll", "recurrent_windows", "train_recurrent"]
