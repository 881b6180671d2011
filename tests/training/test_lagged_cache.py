"""Lagged Cache Training of the recurrent context model, against training through the recurrence."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.bench.lagged_cache_comparison import recurrent_part
from cascade_bench.models.recurrent_context import RecurrentContextLM
from cascade_bench.training.lagged_cache import lagged_contexts, recurrent_nll, recurrent_windows, train_recurrent
from cascade_bench.training.loops import TrainConfig


def _model(seed: int = 0) -> RecurrentContextLM:
    torch.manual_seed(seed)
    return RecurrentContextLM(vocab_size=64, hidden_size=16, inner_size=32)


def _stream(length: int, seed: int = 1) -> torch.Tensor:
    # a learnable stream: a repeated random phrase with noise
    generator = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, 64, (23,), generator=generator)
    stream = phrase.repeat(length // 23 + 1)[:length].clone()
    noise = torch.rand(length, generator=generator) < 0.1
    stream[noise] = torch.randint(0, 64, (int(noise.sum()),), generator=generator)
    return stream


def test_the_recurrence_is_one_update_after_another():
    model = _model().eval()
    ids = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        contexts = model.contexts(ids)
        context = model.initial_context(3)
        for t in range(7):
            context = model.next_context(context, ids[:, t])
            torch.testing.assert_close(contexts[:, t], context, rtol=0, atol=0)
    with pytest.raises(ValueError, match="previous contexts must have shape \\(3, 7, 16\\)"):
        model.next_context(torch.zeros(3, 16), ids)
    with pytest.raises(ValueError, match="hidden_size must be a positive int, got 0"):
        RecurrentContextLM(64, hidden_size=0)


def test_lagged_passes_reach_the_recurrence_position_by_position():
    """From any cache, pass k makes positions 0..k-1 exact; T passes give the recurrence exactly, and
    the recurrence's own contexts are a fixed point of a pass."""
    model = _model().eval()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        exact = model.contexts(ids)
        cached = torch.randn(2, 6, 16)
        for k in range(1, 7):
            cached = lagged_contexts(model, ids, cached)
            torch.testing.assert_close(cached[:, :k], exact[:, :k], rtol=1e-6, atol=1e-6)
            if k < 6:
                assert not torch.allclose(cached[:, k:], exact[:, k:], atol=1e-3)
        torch.testing.assert_close(lagged_contexts(model, ids, exact), exact, rtol=1e-6, atol=1e-6)


def test_windows_and_errors():
    windows = recurrent_windows(torch.arange(20), 4)
    assert windows.shape == (4, 5) and torch.equal(windows[1], torch.arange(4, 9))
    assert recurrent_windows(torch.arange(20), 4, max_windows=2).shape == (2, 5)
    with pytest.raises(ValueError, match="holds no window of 30 \\+ 1 tokens"):
        recurrent_windows(torch.arange(20), 30)
    with pytest.raises(ValueError, match="order must be one of \\['sequential', 'lagged-cache'\\], got 'lagged'"):
        train_recurrent(_model(), windows, windows, "lagged")


@pytest.mark.parametrize("order", ["sequential", "lagged-cache"])
def test_both_orders_learn_the_recurrence_and_are_deterministic(order):
    train, validation = recurrent_windows(_stream(2000), 16), recurrent_windows(_stream(400, seed=1), 16)
    before = recurrent_nll(_model(), validation)
    runs = []
    for _ in range(2):
        model = _model()
        history = train_recurrent(
            model,
            train,
            validation,
            order,
            TrainConfig(lr=1e-2, max_epochs=3, patience=3),
            batch_size=8,
            progress=False,
        )
        runs.append((history, recurrent_nll(model, validation)))
    (history, after), (again, _) = runs
    assert after[1] == before[1] and after[0] < 0.8 * before[0]  # the recurrence's PPL on validation fell
    assert history.val_ppl == again.val_ppl and history.train_loss == again.train_loss
    assert history.best_val_ppl == pytest.approx(torch.tensor(after[0] / after[1]).exp().item(), rel=1e-5)


def test_the_bench_part_compares_orders_on_the_same_data():
    streams = {split: _stream(600, seed=i) for i, split in enumerate(("train", "validation", "test"))}
    rows = recurrent_part(streams, 64, window=16, batch_size=8, max_epochs=1, progress=False)
    assert [r["order"] for r in rows] == ["sequential", "lagged-cache"] and rows[0]["speedup"] == 1.0
    for row in rows:
        assert row["epochs"] == 1 and row["stopped by"] == "epoch cap"
        assert row["speedup"] == pytest.approx(row["tokens / s"] / rows[0]["tokens / s"])
