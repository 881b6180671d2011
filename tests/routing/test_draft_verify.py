"""Speculative decoding with a separate draft model and/or prompt lookup is lossless: its tokens
are the real model's greedy tokens at any batch size, padding side, draft and EOS."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_bench.routing.draft_verify import lookup_proposals, speculative_generate
from cascade_bench.routing.generation import generate
from cascade_bench.stages.ensemble import Ensemble
from cascade_bench.training.distillation import draft_from_teacher
from tests.helpers import FAMILIES, tiny_ensemble, token_batch
from tests.routing.test_generation import _ragged_prompts


def _target(preset):
    return tiny_ensemble(preset, layers=(4,))[0]


def _greedy(target, ids, mask, new, **kwargs):
    return generate(Ensemble([target]), ids, mask, max_new_tokens=new, method="full", **kwargs).tokens


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("lengths,side", [([12], "left"), ([9, 14, 5, 11], "left"), ([9, 14, 5], "right")])
def test_draft_verify_equals_the_real_model_s_greedy_decoding(preset, lengths, side, text):
    target = _target(preset)
    ids, mask = _ragged_prompts(text, lengths, side)
    reference = _greedy(target, ids, mask, 17)
    other = tiny_ensemble(preset, layers=(1,), seed=5)[0]  # an unrelated draft: few proposals agree
    cut = draft_from_teacher(target, 2)  # the real model's first layers: some agree
    settings = [
        dict(draft=other, draft_length=3),
        dict(draft=cut, draft_length=2),
        dict(draft=cut, draft_length=4, confidence=0.05),
        dict(draft=cut, draft_length=2, draft_vocabulary=torch.arange(0, 256, 2)),
        dict(lookup=3),
        dict(draft=cut, draft_length=2, lookup=4),
    ]
    for setting in settings:
        out = speculative_generate(target, ids, mask, max_new_tokens=17, **setting)
        assert torch.equal(out.tokens, reference), setting
        assert out.generated == len(lengths) * 17 and len(out.token_seconds) == out.generated
        assert out.accepted <= out.proposed and out.emitted == out.rounds + out.accepted - 0 * out.rounds
        assert out.rounds / len(lengths) <= out.loop_rounds <= out.rounds
        assert out.accepted_from_lookup <= out.from_lookup <= out.proposed
        assert out.accepted + out.rejections <= out.proposed  # a rejecting round rejects at least one
        if "lookup" not in setting:
            assert out.from_lookup == 0


def test_a_draft_equal_to_the_real_model_is_always_accepted(text):
    """Hand-derived: every proposal agrees, so a round gains draft_length + 1 tokens until the last
    round, which drafts no more than the row has left minus one; 17 tokens at 3 drafts = 4 + 4 +
    4 + 4 + 1 (5 rounds, 12 drafts, 13 draft calls: one per token drafted but the last of each
    round, plus one read of the unseen tokens per round)."""
    target = _target("llama-tiny")
    ids, mask = _ragged_prompts(text, [10], "left")
    out = speculative_generate(target, ids, mask, max_new_tokens=17, draft=target, draft_length=3)
    assert torch.equal(out.tokens, _greedy(target, ids, mask, 17))
    assert (out.rounds, out.proposed, out.accepted, out.emitted, out.rejections) == (5, 12, 12, 17, 0)
    assert out.acceptance_rate == 1.0 and out.tokens_per_round == 17 / 5
    # rounds 1-4 read one unseen token and feed 2 drafts; round 5 has room 1: no drafting at all
    assert out.draft_calls == 4 * 3
    assert out.verify_tokens == 4 * 4 + 1


def test_eos_stops_each_row_as_greedy_decoding_does(text):
    target = _target("gpt2-tiny")
    ids, mask = _ragged_prompts(text, [9, 14, 5], "left")
    plain = _greedy(target, ids, mask, 16)
    eos = int(plain[0, 4])
    reference = _greedy(target, ids, mask, 16, eos_token_id=eos, pad_token_id=-1)
    for setting in (dict(draft=draft_from_teacher(target, 2), draft_length=3), dict(lookup=3)):
        out = speculative_generate(target, ids, mask, 16, eos_token_id=eos, pad_token_id=-1, **setting)
        assert torch.equal(out.tokens, reference)


def test_lookup_proposes_what_followed_the_latest_earlier_n_gram():
    history = [5, 6, 7, 8, 1, 5, 6, 9, 2, 5, 6]
    assert lookup_proposals(history, ngram=2, limit=3) == [9, 2, 5]  # latest earlier "5 6" is at 5
    assert lookup_proposals(history, ngram=2, limit=1) == [9]
    assert lookup_proposals([1, 2, 3, 4], ngram=2, limit=3) == []  # no n-gram recurs
    assert lookup_proposals([3, 1, 2, 3], ngram=2, limit=2) == [1, 2]  # falls back to 1-gram "3"
    assert lookup_proposals([7], ngram=3, limit=2) == []


def test_bad_arguments_are_refused_before_any_work():
    target = _target("llama-tiny")
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="draft model, prompt lookup"):
        speculative_generate(target, ids)
    with pytest.raises(ValueError, match="draft_length must be an int >= 1, got 0"):
        speculative_generate(target, ids, lookup=2, draft_length=0)
    with pytest.raises(
        ValueError, match=r"confidence must be a probability in \[0, 1\] \(or inf: never draft\), got 1.5"
    ):
        speculative_generate(target, ids, draft=target, confidence=1.5)
    gpt2 = tiny_ensemble("gpt2-tiny", layers=(1,))[0]
    gpt2.model.resize_token_embeddings(300)
    with pytest.raises(ValueError, match="draft's vocabulary \\(300 ids\\) differs"):
        speculative_generate(target, ids, draft=gpt2)
    with pytest.raises(ValueError, match="draft_vocabulary needs a draft model"):
        speculative_generate(target, ids, lookup=2, draft_vocabulary=torch.arange(4))


def test_lossy_drafting_keeps_confident_drafts_and_scores_them_under_the_real_model(text):
    """trust = 0 keeps every draft-model proposal: the output is then the draft's own greedy text
    wherever it drafted, and each token's NLL is the real model's, teacher-forced. trust = 1.0 (no
    draft is that sure) is lossless."""
    target = _target("llama-tiny")
    draft = tiny_ensemble("llama-tiny", layers=(1,), seed=5)[0]
    ids, mask = _ragged_prompts(text, [9, 14], "left")
    reference = _greedy(target, ids, mask, 12)
    exact = speculative_generate(target, ids, mask, 12, draft=draft, draft_length=2, trust=1.0)
    assert torch.equal(exact.tokens, reference) and exact.trusted == 0
    lossy = speculative_generate(target, ids, mask, 12, draft=draft, draft_length=2, trust=0.0)
    assert lossy.acceptance_rate == 1.0 and 0 < lossy.trusted <= lossy.accepted and lossy.rejections == 0
    assert not torch.equal(lossy.tokens, reference)
    # each token's NLL is the real model's over the produced text
    joined = torch.cat([ids, lossy.tokens], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(lossy.tokens)], dim=1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = target.logits(target(input_ids=joined, attention_mask=full_mask, position_ids=positions).hidden)
    start = ids.shape[1] - 1
    expected = -logits[:, start:-1].float().log_softmax(-1).gather(2, lossy.tokens[..., None]).squeeze(2)
    torch.testing.assert_close(lossy.nll, expected, atol=1e-4, rtol=0)
    eos = int(lossy.tokens[0, 3])  # rows stop at EOS: nothing past it counts as trusted
    stopped = speculative_generate(target, ids, mask, 12, draft=draft, draft_length=2, trust=0.0, eos_token_id=eos)
    assert stopped.trusted <= stopped.accepted <= stopped.proposed
    with pytest.raises(ValueError, match="trust \\(lossy drafting\\) needs a draft model"):
        speculative_generate(target, ids, mask, 4, lookup=2, trust=0.5)


def test_calibration_stops_drafting_where_agreement_falls_below_the_draft_s_cost(text):
    """A draft equal to the real model always agrees: every bin passes any cost below 1 and the
    threshold is the lowest confidence seen; a cost above 1 can never be paid: 1.0 (never draft)."""
    from cascade_bench.routing.draft_verify import calibrate_confidence

    target = _target("llama-tiny")
    windows = token_batch(text, 3, 16)
    threshold, curve = calibrate_confidence(target, target, windows, cost=0.5, bins=4)
    assert [rate for _, rate in curve] == [1.0] * 4 and threshold == curve[-1][0]
    assert [edge for edge, _ in curve] == sorted((edge for edge, _ in curve), reverse=True)
    assert calibrate_confidence(target, target, windows, cost=1.5, bins=4)[0] == math.inf
    other = tiny_ensemble("llama-tiny", layers=(1,), seed=5)[0]
    threshold, curve = calibrate_confidence(other, target, windows, cost=0.2, bins=4)
    # the curve stops at the first bin below the cost; the threshold is the last passing bin's edge
    assert all(rate >= 0.2 for _, rate in curve[:-1])
    if curve[-1][1] >= 0.2:
        assert threshold == curve[-1][0]
    else:
        assert threshold == (curve[-2][0] if len(curve) > 1 else math.inf)
