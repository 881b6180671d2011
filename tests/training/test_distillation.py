"""Draft distillation, by hand: the draft starts as the teacher's first layers exactly, the loss is
cross-entropy to the teacher's renormalised top-k, targets are cached by content, and the decode
vocabulary is the most frequent ids."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.stages.ensemble import Ensemble
from cascade_bench.training.distillation import (
    DraftConfig,
    distill,
    distillation_loss,
    draft_from_teacher,
    frequent_ids,
    teacher_targets,
    windows_of,
)
from tests.helpers import tiny_ensemble, token_batch


def _teacher():
    return tiny_ensemble("llama-tiny", layers=(4,))[0]


def test_the_draft_starts_as_the_teacher_s_first_layers_through_its_head(text):
    teacher = _teacher()
    draft = draft_from_teacher(teacher, 2)
    ids = token_batch(text, 2, 16)
    cut = Ensemble.from_blocks(teacher.model, [2])  # the teacher's first 2 layers, its own norm and head
    with torch.inference_mode():
        expected = cut[0].logits(cut[0](input_ids=ids).hidden)
        got = draft.logits(draft(input_ids=ids).hidden)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert draft.num_layers == 2 and teacher.num_layers == 4
    draft.model.model.embed_tokens.weight.data.add_(1.0)  # its own weights, not the teacher's
    assert not torch.equal(draft.model.model.embed_tokens.weight, teacher.model.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="draft layers must be an int in \\[1, 3\\], got 4"):
        draft_from_teacher(teacher, 4)


def test_the_loss_is_cross_entropy_to_the_renormalised_top_k(text):
    teacher = _teacher()
    draft = draft_from_teacher(teacher, 1)
    ids = token_batch(text, 1, 8)
    logits = torch.tensor([[[2.0, 0.0]] * 8])  # teacher: p = softmax(2, 0) over its top 2 ids
    top = torch.tensor([[[3, 7]] * 8], dtype=torch.int32)
    loss, count = distillation_loss(draft, ids, logits, top)
    with torch.no_grad():
        log_q = draft.logits(draft(input_ids=ids).hidden).log_softmax(-1)
    p = torch.tensor([2.0, 0.0]).softmax(-1)
    expected = -(p[0] * log_q[0, :, 3] + p[1] * log_q[0, :, 7]).mean()
    assert count == 8 and float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    # hard weighting: tokens the draft gets wrong weigh 1 + w
    weighted, _ = distillation_loss(draft, ids, logits, top, hard_weight=2.0)
    wrong = (log_q.argmax(-1) != 3).float()[0]
    per_token = -(p[0] * log_q[0, :, 3] + p[1] * log_q[0, :, 7])
    weights = 1 + 2.0 * wrong
    assert float(weighted.detach()) == pytest.approx(float((per_token * weights).sum() / weights.sum()), rel=1e-5)


def test_teacher_targets_are_cached_by_content(tmp_path, text):
    teacher = _teacher()
    windows = windows_of(token_batch(text, 1, 200)[0], 32, 128)
    assert windows.shape == (4, 33)  # 128 input tokens: 4 windows of 32 inputs, each with its next token
    first = teacher_targets(teacher, windows, 4, tmp_path, "t")
    assert len(list(tmp_path.glob("teacher-*.pt"))) == 1
    teacher.model.model.embed_tokens.weight.data.zero_()  # a cache hit never runs the teacher
    again = teacher_targets(teacher, windows, 4, tmp_path, "t")
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[1].shape == (4, 32, 4)


def test_frequent_ids_keep_the_most_common_and_break_ties_by_id():
    stream = torch.tensor([5, 5, 5, 2, 2, 9, 9, 1])
    assert frequent_ids(stream, 2, 10) == [2, 5]  # 5 (3 times), then 2 and 9 tie (2 each): 2 wins
    assert frequent_ids(stream, 0, 4) == [0, 1, 2, 3]


def test_distillation_raises_agreement_and_records_how_it_stopped(text):
    teacher = _teacher()
    draft = draft_from_teacher(teacher, 1)
    stream = token_batch(text, 1, 1200)[0]
    train, validation = windows_of(stream[:1000], 32, 1000), windows_of(stream[1000:], 32, 200)
    config = DraftConfig(layers=1, top_k=8, window=32, batch_size=4, lr=3e-3, steps_per_check=8, patience=2, seconds=60)
    history = distill(
        draft,
        train,
        teacher_targets(teacher, train, 8),
        validation,
        teacher_targets(teacher, validation, 8),
        config,
        progress=False,
    )
    assert max(history.val_agreement) > history.start_agreement
    assert history.val_agreement[history.best_check] == max(history.val_agreement)
    assert history.stop_reason in ("early stopping", "time budget")


def test_bad_draft_settings_are_refused():
    with pytest.raises(ValueError, match="draft layers must be a positive int, got 0"):
        DraftConfig(layers=0)
    with pytest.raises(ValueError, match="draft vocabulary must be an int >= 0"):
        DraftConfig(vocabulary=-1)
    with pytest.raises(ValueError, match="draft hard_weight must be a number >= 0, got -1"):
        DraftConfig(hard_weight=-1)


def test_cached_teacher_targets_are_keyed_by_the_teacher_s_weights(tmp_path):
    """Two checkpoints of one config, same file names and sizes, differ in their key."""
    from cascade_bench.training.draft_job import _teacher_fingerprint

    teacher = _teacher()
    teacher.model.save_pretrained(tmp_path / "a")
    first = _teacher_fingerprint(tmp_path / "a", teacher)
    teacher.model.model.embed_tokens.weight.data.add_(1.0)
    teacher.model.save_pretrained(tmp_path / "a")
    assert _teacher_fingerprint(tmp_path / "a", teacher) != first
