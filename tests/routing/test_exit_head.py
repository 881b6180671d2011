"""The exit head's chunking: a large vocabulary still gets chunks big enough for an efficient matmul,
and chunking never changes a result."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from cascade_bench.measure.probes import Probe
from cascade_bench.routing import exit_head
from cascade_bench.routing.exit_head import MIN_CHUNK_TOKENS, run_exit_head
from tests.helpers import tiny_ensemble


class CountingProbe(Probe):
    def __init__(self):
        self.names = []

    def span(self, name):
        self.names.append(name)
        return nullcontext()


def test_chunks_are_never_smaller_than_the_minimum_and_change_nothing(monkeypatch):
    stage = tiny_ensemble("gpt2-tiny")[0]
    # an element budget that alone would give chunks of 2 tokens at this vocabulary
    monkeypatch.setattr(exit_head, "LOGITS_CHUNK_ELEMENTS", 2 * stage.vocab_size)
    tokens = 2 * MIN_CHUNK_TOKENS + 88
    torch.manual_seed(0)
    hidden = torch.randn(tokens, stage.hidden_size)
    targets = torch.randint(0, stage.vocab_size, (tokens,))
    probe = CountingProbe()
    with torch.inference_mode():
        chunked = run_exit_head(stage, 0, hidden, targets, exit_rule=stage.exit_rule, probe=probe)
        whole = run_exit_head(stage, 0, hidden, targets, exit_rule=stage.exit_rule, chunk_tokens=tokens)
    assert probe.names.count("stage0.exit_head") == 3  # 256 + 256 + 88 tokens, not 300 chunks of 2
    assert torch.equal(chunked.prediction, whole.prediction)
    torch.testing.assert_close(chunked.nll, whole.nll)
    torch.testing.assert_close(chunked.confidence, whole.confidence)


def test_one_chunk_and_many_agree_and_no_tokens_give_empty_results():
    stage = tiny_ensemble("gpt2-tiny")[0]
    torch.manual_seed(1)
    hidden = torch.randn(50, stage.hidden_size)
    targets = torch.randint(0, stage.vocab_size, (50,))
    targets[::7] = -100  # not scored: the NLL there is meaningless, the rest must not change
    with torch.inference_mode():
        whole = run_exit_head(stage, 0, hidden, targets, stage.exit_rule, keep_logits=True)
        pieces = run_exit_head(stage, 0, hidden, targets, stage.exit_rule, keep_logits=True, chunk_tokens=16)
        none = run_exit_head(stage, 0, hidden[:0], targets[:0], stage.exit_rule, keep_logits=True)
    # chunks change the matmul's blocking, so logits may differ in the last bits; nothing else changes
    assert torch.equal(whole.prediction, pieces.prediction) and torch.equal(whole.correct, pieces.correct)
    for field in ("nll", "confidence", "logits"):
        torch.testing.assert_close(getattr(whole, field), getattr(pieces, field))
    assert (whole.nll.dtype, whole.correct.dtype, whole.prediction.dtype, whole.confidence.dtype) == (
        torch.float32,
        torch.bool,
        torch.int64,
        torch.float32,
    )
    assert torch.equal(whole.prediction, whole.logits.argmax(-1))
    assert torch.equal(whole.correct, whole.prediction == targets)
    expected_nll = torch.logsumexp(whole.logits, -1) - whole.logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    torch.testing.assert_close(whole.nll, expected_nll)
    assert none.nll.shape == none.prediction.shape == none.confidence.shape == (0,)
    assert none.logits.shape == (0, stage.vocab_size) and none.prediction.dtype == torch.int64


def test_non_finite_logits_are_refused_whichever_chunk_has_them():
    import pytest

    stage = tiny_ensemble("gpt2-tiny")[0]
    hidden = torch.randn(40, stage.hidden_size)
    hidden[33, 0] = float("nan")
    targets = torch.zeros(40, dtype=torch.long)
    for chunk in (40, 16):
        with torch.inference_mode(), pytest.raises(ValueError, match="stage 2 produced non-finite logits"):
            run_exit_head(stage, 2, hidden, targets, chunk_tokens=chunk)
