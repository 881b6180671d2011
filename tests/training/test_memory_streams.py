"""Training a memory-layer model on chunked streams: sequential order vs lagged chunk memories."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.models.memory_lm import create_model
from cascade_bench.training.memory_streams import chunk_loss, stream_chunks, streamed_nll, train_on_streams
from tests.helpers import token_batch

TINY = dict(vocab_size=256, hidden_size=32, num_attention_heads=2, intermediate_size=64, segment_length=8)


def tiny(name: str = "infini"):
    torch.manual_seed(0)
    return create_model(name, **TINY)


def _chunks(text: str, streams: int, chunks: int, length: int = 16, offset: int = 0):
    return stream_chunks(token_batch(text, 1, streams * chunks * length, offset).reshape(-1), streams, length)


def test_stream_chunks_are_consecutive_pieces_of_the_stream():
    stream = torch.arange(50)
    chunks = stream_chunks(stream, 2, 4)
    assert chunks.shape == (2, 6, 4)
    assert torch.equal(chunks[0].reshape(-1), torch.arange(24)) and torch.equal(chunks[1, 0], torch.arange(24, 28))
    assert stream_chunks(stream, 2, 4, max_chunks=3).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="cannot make 20 streams"):
        stream_chunks(stream, 20, 4)
    with pytest.raises(ValueError, match="chunk_len must be a positive int"):
        stream_chunks(stream, 2, 0)


@pytest.mark.parametrize("name", ["infini", "multi_memory", "hierarchical"])
def test_lagged_and_sequential_take_the_same_first_step_from_the_same_state(name, text):
    """One stream group, one chunk: both orders take exactly one step, from the same weights and the
    same (empty) memories, so they end with the same weights."""
    train, validation = _chunks(text, 4, 1), _chunks(text, 2, 2, offset=3000)
    models = {order: tiny(name) for order in ("sequential", "lagged-chunks")}
    for order, model in models.items():
        train_on_streams(model, train, validation, order, batch_size=4, max_epochs=1)
    for (key, a), b in zip(models["sequential"].state_dict().items(), models["lagged-chunks"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def test_a_lagged_cache_from_a_pass_with_the_same_weights_gives_the_sequential_losses(text):
    """LCT's inputs are the sequential pass's memories when the weights have not moved since: each
    chunk's loss from the cached memories equals its loss in stream order."""
    model = tiny().eval()
    chunks = _chunks(text, 2, 4)
    with torch.no_grad():
        sequential, state, lagged = [], None, {}
        for i in range(chunks.shape[1]):
            loss, state = chunk_loss(model, chunks[:, i], state)
            sequential.append(float(loss))
            lagged[i + 1] = state
        from_cache = [float(chunk_loss(model, chunks[:, i], lagged.get(i))[0]) for i in (3, 0, 2, 1)]
    assert from_cache == [sequential[i] for i in (3, 0, 2, 1)]
    # and the memories matter: chunk 3 alone (empty memories) scores differently
    with torch.no_grad():
        assert float(chunk_loss(model, chunks[:, 3], None)[0]) != sequential[3]


def test_streamed_nll_carries_memories_across_chunks(text):
    model = tiny().eval()
    chunks = _chunks(text, 2, 3)
    nll, tokens = streamed_nll(model, chunks, batch_size=2)
    assert tokens == 2 * 3 * 15
    with torch.no_grad():
        state, expected = None, 0.0
        for i in range(3):
            loss, state = chunk_loss(model, chunks[:, i], state)
            expected += float(loss) * 2 * 15
    assert nll == pytest.approx(expected, rel=1e-9)


def test_training_improves_validation_and_records_its_history(text):
    model = tiny()
    train, validation = _chunks(text, 8, 4), _chunks(text, 2, 2, offset=5000)
    before = streamed_nll(model, validation)[0]
    history = train_on_streams(model, train, validation, "lagged-chunks", batch_size=4, max_epochs=3, patience=1)
    assert history.steps_per_epoch == 2 * 4 and len(history.epoch_seconds) == len(history.validation_ppl) >= 1
    assert history.stopped_by in ("early stopping", "epoch cap")
    assert streamed_nll(model, validation)[0] < before
    with pytest.raises(ValueError, match="order must be one of"):
        train_on_streams(model, train, validation, "random")
