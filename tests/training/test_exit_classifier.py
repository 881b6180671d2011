"""Training the learned exit classifier: labels by hand, loss goes down, stages untouched."""

from __future__ import annotations

import pytest
import torch

from cascade_bench import calibrate_thresholds, routed_forward
from cascade_bench.routing.passes import forward_cascade
from cascade_bench.training.exit_classifier import classifier_bce, exit_labels, train_exit_classifier
from cascade_bench.training.loops import TrainConfig
from tests.helpers import tiny_ensemble, token_batch


def _batches(text, count=3):
    return [token_batch(text, 2, 48, offset=600 * i) for i in range(count)]


@pytest.mark.parametrize("target", ["consistency", "correctness"])
def test_labels_are_stage_argmax_against_full_depth_or_the_target(text, target):
    ensemble = tiny_ensemble("gpt2-tiny")
    ids = token_batch(text, 2, 32)
    data = exit_labels(ensemble, 0, [ids], target=target)
    with torch.inference_mode():
        out = forward_cascade(ensemble, ids, method="masked", thresholds=[float("inf")])
    scored = out.scored.flatten()
    first = out.stage_prediction[0].flatten()[scored]
    reference = (out.stage_prediction[1].flatten()[scored] if target == "consistency"
                 else torch.cat([ids[:, 1:], torch.full((2, 1), -1)], dim=1).flatten()[scored])
    assert torch.equal(data.label, (first == reference).float())
    assert data.h_out.shape == (int(scored.sum()), ensemble[0].hidden_size)


def test_training_lowers_the_loss_and_leaves_the_stages_alone(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    before = {k: v.clone() for k, v in ensemble.state_dict().items()}
    train, validation = _batches(text), [token_batch(text, 2, 48, offset=5000)]
    config = TrainConfig(lr=1e-2, max_epochs=15, patience=3, weight_decay=0.0)
    torch.manual_seed(0)
    classifier, history = train_exit_classifier(ensemble, 0, train, validation, use_input_state=True,
                                                hidden_units=8, config=config)
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.best_val_ppl < history.val_ppl[0]  # validation BCE
    assert history.best_val_ppl == pytest.approx(classifier_bce(classifier, exit_labels(
        ensemble, 0, validation, use_input_state=True)))
    after = ensemble.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not classifier.training and all(p.grad is None for p in classifier.parameters())
    ensemble[0].exit_function = classifier
    calibrate_thresholds(ensemble, validation, 0.5)
    with torch.inference_mode():
        out = routed_forward(ensemble, validation[0])
    assert out.tokens_exited[0] == pytest.approx(0.5 * out.tokens_entered[0], abs=2)


def test_classifier_errors_name_the_value(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    with pytest.raises(ValueError, match=r"non-last stage in \[0, 0\], got 1"):
        exit_labels(ensemble, 1, [token_batch(text, 1, 16)])
    with pytest.raises(ValueError, match="target must be 'consistency' or 'correctness', got 'agree'"):
        exit_labels(ensemble, 0, [token_batch(text, 1, 16)], target="agree")
