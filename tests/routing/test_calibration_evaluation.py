"""Calibration and evaluation records against hand-derived figures."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_bench import forward_cascade
from cascade_bench.routing.calibration import calibrate_thresholds, threshold_for_hard_ratio
from cascade_bench.routing.evaluation import evaluate
from tests.helpers import tiny_ensemble, token_batch


def test_threshold_for_hard_ratio_by_hand():
    confidence = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 1.0, 0.4, 0.6, 0.8])
    assert threshold_for_hard_ratio(confidence, 0.3) == pytest.approx(0.4)  # 0.1, 0.2, 0.3 continue
    assert threshold_for_hard_ratio(confidence, 0.0) == pytest.approx(0.1)  # nobody below the minimum
    assert threshold_for_hard_ratio(confidence, 1.0) == math.inf
    assert threshold_for_hard_ratio(confidence, 0.25) == pytest.approx(0.4)  # ceil(2.5) = 3 continue
    for ratio in (0.0, 0.3, 0.5, 0.9, 1.0):
        t = threshold_for_hard_ratio(confidence, ratio)
        assert int((confidence < t).sum()) == math.ceil(ratio * 10)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_hard_ratio_must_be_a_fraction(bad):
    with pytest.raises(ValueError, match="hard_ratio must be a number in"):
        threshold_for_hard_ratio(torch.rand(4), bad)


def test_calibration_hits_the_ratio_on_its_own_data(text):
    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1, 1))
    batches = [token_batch(text, 4, 32, offset=2000 * i) for i in range(3)]
    thresholds = calibrate_thresholds(ensemble, batches, [0.5, 0.25])
    assert ensemble.thresholds[:2] == thresholds
    out = [forward_cascade(ensemble, b) for b in batches]
    total = sum(o.num_tokens for o in out)
    reached1 = sum(o.tokens_entered[1] for o in out)
    reached2 = sum(o.tokens_entered[2] for o in out)
    assert reached1 == math.ceil(0.5 * total)  # continuous confidences: no ties
    assert reached2 == math.ceil(0.25 * reached1)


def test_evaluate_aggregates_like_a_hand_computation(text):
    ensemble = tiny_ensemble("llama-tiny")
    batches = [token_batch(text, 2, 24, offset=500 * i) for i in range(3)]
    calibrate_thresholds(ensemble, batches, 0.5)
    result = evaluate(ensemble, batches, conditions={"dataset": "pydoc topics"})
    outs = [forward_cascade(ensemble, b) for b in batches]
    nll = torch.cat([o.nll[o.scored] for o in outs])
    exit_stage = torch.cat([o.exit_stage[o.scored] for o in outs])
    stage0 = torch.cat([o.stage_nll[0][o.scored] for o in outs])
    hard = exit_stage > 0
    assert result.tokens == nll.numel() == 3 * 2 * 23
    assert result.routed_tokens == 3 * 2 * 24
    assert result.ppl == pytest.approx(math.exp(nll.double().mean().item()), rel=1e-9)
    assert result.hard_ppl == pytest.approx(math.exp(nll[hard].double().mean().item()), rel=1e-9)
    assert result.easy_ppl == pytest.approx(math.exp(nll[~hard].double().mean().item()), rel=1e-9)
    assert result.hard_ppl_stage0 == pytest.approx(math.exp(stage0[hard].double().mean().item()), rel=1e-9)
    assert result.exit_ratios == pytest.approx((0.5, 0.5))
    assert result.layer_cost == pytest.approx(0.75)  # 2 + 2 layers, half the tokens skip stage 1
    assert result.conditions["dataset"] == "pydoc topics"
    for key in ("device", "dtype", "threads", "torch", "transformers", "git_commit", "batch_shapes"):
        assert key in result.conditions
    full = evaluate(ensemble, batches, method="full")
    assert full.layer_cost == 1.0 and full.exit_ratios == (0.0, 1.0)
    assert not ensemble.training


def test_evaluate_restores_training_mode(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    ensemble.train()
    evaluate(ensemble, [token_batch(text, 1, 8)])
    assert ensemble.training
    with pytest.raises(ValueError, match="no batches"):
        evaluate(ensemble, [])


@pytest.mark.parametrize("layers", [(2, 2), (1, 1, 2)])
def test_a_sweep_calibrates_every_ratio_as_one_call_per_ratio_would(layers, text):
    from cascade_bench.routing.calibration import calibrate_sweep

    ensemble = tiny_ensemble("gpt2-tiny", layers=layers)
    batches = [token_batch(text, 3, 20), token_batch(text, 3, 20, offset=300)]
    before = ensemble.thresholds
    sweep = calibrate_sweep(ensemble, batches, [0.2, 0.5, 0.8])
    assert ensemble.thresholds == before  # left as they were
    for ratio, thresholds in sweep.items():
        assert thresholds == calibrate_thresholds(ensemble, batches, ratio)
