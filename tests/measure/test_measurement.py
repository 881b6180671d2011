"""Counted FLOPs, peak tensor memory and timers against hand-derived figures."""

from __future__ import annotations

import pytest
import torch

from cascade_bench import forward_cascade
from cascade_bench.measure.flops import count_flops
from cascade_bench.measure.memory import peak_memory_bytes
from cascade_bench.measure.timing import TimingStats, time_call
from tests.helpers import tiny_ensemble, token_batch


def _confidence(ensemble, ids):
    with torch.inference_mode():
        return forward_cascade(ensemble, ids, num_stages=1, confidence_at_last_stage=True).stage_confidence[0]


def _median_confidence(ensemble, ids) -> float:
    return float(_confidence(ensemble, ids).median())


def test_gpt2_counted_flops_equal_the_hand_formula(text):
    # GPT-2 layer per token: QKV 3d^2 + out d^2 + MLP 8d^2 = 12 d^2 MACs; attention (counted full,
    # as torch's SDPA formula does): 2 * B * H * T^2 * (d/H) MACs per layer; lm_head d * V per token.
    ensemble = tiny_ensemble("gpt2-tiny")
    batch, seq, d, vocab, layers = 3, 16, 32, 256, 4
    with torch.inference_mode():
        counted, _ = count_flops(forward_cascade, ensemble, token_batch(text, batch, seq), method="full")
    tokens = batch * seq
    macs = layers * (12 * d * d * tokens + 2 * batch * seq * seq * d) + tokens * d * vocab
    assert counted.flops == 2 * macs
    assert counted.macs == macs
    assert counted.by_op["_scaled_dot_product_flash_attention_for_cpu"] == 2 * layers * 2 * batch * seq * seq * d


def test_routed_flops_never_exceed_masked(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    ids = token_batch(text, 4, 32)
    confidence = _confidence(ensemble, ids)
    with torch.inference_mode():
        for threshold in (0.0, *confidence.quantile(torch.tensor([0.25, 0.5, 0.75])).tolist(), 1.0):
            routed, _ = count_flops(forward_cascade, ensemble, ids, thresholds=[threshold])
            masked, _ = count_flops(forward_cascade, ensemble, ids, thresholds=[threshold], method="masked")
            assert routed.flops <= masked.flops


def test_peak_tensor_bytes_by_hand():
    x = torch.randn(1000, 1000)

    def three_temporaries():
        a = x @ x  # 4 MB alive
        b = a.relu()  # 8 MB alive: the peak
        del a
        c = b + 1  # 8 MB again
        return c.sum()

    peak, how, _ = peak_memory_bytes(three_temporaries)
    assert how == "peak_live_tensor_bytes"
    assert peak == 2 * 4_000_000 + 4  # two 1000x1000 float32 + the 4-byte sum

    def views_and_inplace_cost_nothing():
        x.t().add_(0)
        return x.view(-1)[:10]

    assert peak_memory_bytes(views_and_inplace_cost_nothing)[0] == 0


def test_routed_peak_memory_not_above_masked(text):
    # Against the full cascade the answer depends on the widths (the stage-0 exit head over every
    # token can dominate a tiny model); the benchmark reports that ratio for the CPU preset.

    ensemble = tiny_ensemble("gpt2-tiny")
    ids = token_batch(text, 4, 64)
    threshold = _median_confidence(ensemble, ids)
    with torch.inference_mode():
        masked, _, _ = peak_memory_bytes(
            lambda: forward_cascade(ensemble, ids, thresholds=[threshold], method="masked")
        )
        routed, _, out = peak_memory_bytes(lambda: forward_cascade(ensemble, ids, thresholds=[threshold]))
    assert 0 < out.tokens_entered[1] < out.tokens_entered[0]
    assert 0 < routed <= masked


def test_timing_stats_by_hand():
    stats = TimingStats((1.0, 2.0, 3.0, 4.0, 100.0))
    assert stats.median == 3.0
    assert stats.iqr == pytest.approx(4.0 - 2.0)
    calls = []
    timed = time_call(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(timed.samples) == 3 and all(s >= 0 for s in timed.samples)
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_call(lambda: None, repeats=0)
