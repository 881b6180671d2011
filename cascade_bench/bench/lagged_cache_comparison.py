"""Lagged Cache Training against training through the recurrence, on the same model and data.

One ``models.recurrent_context.RecurrentContextLM`` (hidden 128, update MLP 512, tied head), BPE
1,024 on the embedded corpus, windows of ``window`` tokens cut from the train split, trained from
the same initial weights in each order of ``training.lagged_cache`` to early stopping on the
recurrence's validation PPL; then the recurrence's PPL on the test split. Per order: epochs, time
per epoch spent in training steps (validation excluded), tokens per second, and the speedup of
each order's training throughput over the first order's (sequential, by default).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..models.recurrent_context import RecurrentContextLM
from ..training.lagged_cache import RECURRENT_ORDERS, recurrent_nll, recurrent_windows, train_recurrent
from ..training.loops import TrainConfig

#: The seed's claim for Lagged Cache Training over sequential training of its recurrent context.
SEED_SPEEDUP_CLAIM = 22.0


def recurrent_part(
    streams: dict,
    vocab_size: int,
    window: int = 128,
    batch_size: int = 16,
    max_epochs: int = 40,
    patience: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    orders: Sequence[str] = RECURRENT_ORDERS,
    progress: bool = True,
) -> list[dict]:
    """Rows of the table: one per training order (see module docstring)."""
    train, validation, test = (recurrent_windows(streams[s], window) for s in ("train", "validation", "test"))
    rows, reference = [], None
    for order in orders:
        torch.manual_seed(seed)
        model = RecurrentContextLM(vocab_size)
        history = train_recurrent(
            model,
            train,
            validation,
            order,
            TrainConfig(lr=lr, max_epochs=max_epochs, patience=patience, seed=seed),
            batch_size=batch_size,
            progress=progress,
        )
        total, count = recurrent_nll(model, test)
        tokens_per_s = history.tokens_per_s
        reference = reference or tokens_per_s
        rows.append(
            {
                "order": order,
                "window": window,
                "epochs": history.epochs,
                "best epoch": history.best_epoch + 1,
                "stopped by": history.stop_reason,
                "train s / epoch": history.train_tokens / tokens_per_s / history.epochs,
                "tokens / s": tokens_per_s,
                "speedup": tokens_per_s / reference,
                "validation PPL": history.best_val_ppl,
                "test PPL": float(torch.tensor(total / count).exp()),
            }
        )
        if progress:
            print(f"[recurrent] {order}: {rows[-1]}", flush=True)
    return rows


__all__ = ["SEED_SPEEDUP_CLAIM", "recurrent_part"]
