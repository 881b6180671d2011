"""Training the learned exit classifier: labels by hand, loss goes down, stages untouched."""

from __future__ import annotations

import pytest
import torch

from cascade_bench import calibrate_thresholds, forward_cascade
from cascade_bench.routing.exit_head import run_exit_head
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
    reference = (
        out.stage_prediction[1].flatten()[scored]
        if target == "consistency"
        else torch.cat([ids[:, 1:], torch.full((2, 1), -1)], dim=1).flatten()[scored]
    )
    assert torch.equal(data.label, (first == reference).float())
    assert data.h_out.shape == (int(scored.sum()), ensemble[0].hidden_size)


def test_training_lowers_the_loss_and_leaves_the_stages_alone(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    before = {k: v.clone() for k, v in ensemble.state_dict().items()}
    train, validation = _batches(text), [token_batch(text, 2, 48, offset=5000)]
    config = TrainConfig(lr=1e-2, max_epochs=15, patience=3, weight_decay=0.0)
    torch.manual_seed(0)
    classifier, history = train_exit_classifier(
        ensemble, 0, train, validation, use_input_state=True, hidden_units=8, config=config
    )
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.best_val_ppl < history.val_ppl[0]  # validation BCE
    assert history.best_val_ppl == pytest.approx(
        classifier_bce(classifier, exit_labels(ensemble, 0, validation, use_input_state=True))
    )
    after = ensemble.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not classifier.training and all(p.grad is None for p in classifier.parameters())
    ensemble[0].exit_rule = classifier
    calibrate_thresholds(ensemble, validation, 0.5)
    with torch.inference_mode():
        out = forward_cascade(ensemble, validation[0])
    assert out.tokens_exited[0] == pytest.approx(0.5 * out.tokens_entered[0], abs=2)


@pytest.mark.parametrize("target", ["consistency", "correctness"])
def test_later_stage_features_are_the_routed_pass_states_of_the_continuing_tokens(text, target):
    """Stage 1 of 3 sees, when routed, only the tokens that continue past stage 0, gathered at
    compact positions: its classifier's features must be those states (not the no-exit pass's)."""
    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1, 1))
    batches = _batches(text, 2)
    calibrate_thresholds(ensemble, batches, [0.5, 0.5])
    stage0_threshold = ensemble[0].threshold
    data = exit_labels(ensemble, 1, batches, target=target)
    predictions, confidences, labels = [], [], []
    with torch.inference_mode():
        for batch in batches:
            # the routed pass at stage 0's threshold; nobody exits from stage 1 on
            out = forward_cascade(
                ensemble,
                batch,
                method="routed",
                thresholds=[stage0_threshold, float("inf")],
                confidence_at_last_stage=True,
            )
            reached = (out.exit_stage.flatten() >= 1) & out.scored.flatten()
            first = out.stage_prediction[1].flatten()[reached]
            predictions.append(first)
            confidences.append(out.stage_confidence[1].flatten()[reached])
            if target == "consistency":
                reference = out.stage_prediction[2].flatten()[reached]
            else:
                reference = torch.cat([batch[:, 1:], torch.full((batch.shape[0], 1), -1)], dim=1).flatten()[reached]
            labels.append((first == reference).float())
    with torch.inference_mode():
        head = run_exit_head(
            ensemble[1], 1, data.h_out, torch.full((data.h_out.shape[0],), -1), exit_rule=ensemble[1].exit_rule
        )
    assert data.h_out.shape[0] == int(torch.cat(predictions).numel()) < sum(b.numel() for b in batches)
    assert torch.equal(head.prediction, torch.cat(predictions))
    torch.testing.assert_close(head.confidence, torch.cat(confidences), rtol=1e-5, atol=1e-6)
    assert torch.equal(data.label, torch.cat(labels))
    assert ensemble[0].threshold == stage0_threshold  # nothing was changed


def test_classifier_errors_name_the_value(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    with pytest.raises(ValueError, match=r"non-last stage in \[0, 0\], got 1"):
        exit_labels(ensemble, 1, [token_batch(text, 1, 16)])
    with pytest.raises(ValueError, match="target must be 'consistency' or 'correctness', got 'agree'"):
        exit_labels(ensemble, 0, [token_batch(text, 1, 16)], target="agree")


def test_a_three_stage_classifier_rule_trains_stage_1_on_routed_states_and_restores_the_cascade(text):
    from cascade_bench.experiment.rule_sweep import build_rule

    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1, 1))
    batches = _batches(text, 2)
    calibrate_thresholds(ensemble, batches, [0.5, 0.5])
    before = [(stage.exit_rule, stage.threshold) for stage in ensemble]
    rule = build_rule("classifier", ensemble, batches, batches, max_epochs=1, max_steps_per_epoch=2)
    assert [part["stage"] for part in rule.training] == [0, 1] and len(rule.per_stage) == 2
    assert rule.training[1]["features"].startswith("routed: the tokens continuing past stages 0..0 at hard ratio 0.5")
    assert [(stage.exit_rule, stage.threshold) for stage in ensemble] == before
