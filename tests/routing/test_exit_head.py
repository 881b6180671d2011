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
        chunked = run_exit_head(stage, 0, hidden, targets, exit_function=stage.exit_function, probe=probe)
        whole = run_exit_head(stage, 0, hidden, targets, exit_function=stage.exit_function, chunk_tokens=tokens)
    assert probe.names.count("stage0.exit_head") == 3  # 256 + 256 + 88 tokens, not 300 chunks of 2
    assert torch.equal(chunked.prediction, whole.prediction)
    torch.testing.assert_close(chunked.nll, whole.nll)
    torch.testing.assert_close(chunked.confidence, whole.confidence)
