"""Self-speculative decoding is lossless: its tokens are full-depth greedy tokens."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.routing.generation import generate
from cascade_bench.routing.speculative import self_speculative_generate
from tests.helpers import FAMILIES, KINDS, tiny_ensemble
from tests.routing.test_generation import _ragged_prompts


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lengths", [[12], [9, 14, 5, 11]])
def test_self_speculative_greedy_equals_full_depth_greedy(kind, preset, lengths, text):
    ensemble = tiny_ensemble(preset, layers=(2, 2, 2), kind=kind)
    ids, mask = _ragged_prompts(text, lengths, "left")
    full = generate(ensemble, ids, mask, max_new_tokens=16, method="full")
    for draft_length, draft_stages in ((3, 1), (4, 2)):
        out = self_speculative_generate(
            ensemble, ids, mask, max_new_tokens=16, draft_length=draft_length, draft_stages=draft_stages
        )
        assert torch.equal(out.tokens, full.tokens)
        torch.testing.assert_close(out.nll, full.nll, atol=1e-4, rtol=0)
        assert 0.0 <= out.acceptance_rate <= 1.0 and 1.0 <= out.mean_accepted_length <= draft_length
        # The loop runs until its slowest row is done: from rounds / batch (all rows alike) to rounds.
        assert out.rounds / len(lengths) <= out.loop_rounds <= out.rounds
        assert len(lengths) > 1 or out.loop_rounds == out.rounds
        # Every stage's cache holds exactly the fed tokens: prompt + generated but the last.
        fed = torch.tensor(lengths) + 16 - 1
        assert all(torch.equal(c, fed) for c in out.cache_lengths)
    # With EOS: rows stop at their first EOS, as full-depth greedy does.
    eos = int(full.tokens[0, 4])
    stopped = generate(ensemble, ids, mask, max_new_tokens=16, method="full", eos_token_id=eos, pad_token_id=-1)
    out = self_speculative_generate(
        ensemble, ids, mask, max_new_tokens=16, draft_length=3, eos_token_id=eos, pad_token_id=-1
    )
    assert torch.equal(out.tokens, stopped.tokens)


def test_block_drafts_get_accepted_and_rejected(text):
    # Blocks share the model's head, so stage 0's drafts agree often but not always: both paths run.
    ensemble = tiny_ensemble("gpt_neox-tiny", layers=(2, 2, 2), kind="block")
    ids, mask = _ragged_prompts(text, [9, 14, 5, 11], "left")
    out = self_speculative_generate(ensemble, ids, mask, max_new_tokens=20, draft_length=3)
    assert 0.0 < out.acceptance_rate < 1.0 and out.accepted < out.drafted
    # drafting and verifying are timed apart, and together they are part of the loop's time
    assert out.draft_seconds > 0 and out.verify_seconds > 0
    assert out.draft_seconds + out.verify_seconds <= out.seconds_per_token * out.tokens.numel() + 1e-9


def test_speculative_input_errors(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    ids, mask = _ragged_prompts(text, [5], "left")
    with pytest.raises(ValueError, match=r"draft_stages must be an int in \[1, 1\]"):
        self_speculative_generate(ensemble, ids, mask, draft_stages=2)
    with pytest.raises(ValueError, match="draft_length must be a positive int"):
        self_speculative_generate(ensemble, ids, mask, draft_length=0)


@pytest.mark.parametrize("kind", KINDS)
def test_drafts_stop_at_the_position_limit(kind, text):
    """A 127-token prompt on a 128-position GPT-2 cascade, 2 new tokens, drafts of 4: full-depth
    greedy uses positions up to 127 only, and so must the drafts (they used to run to 130 and
    raise IndexError in the position table)."""
    from tests.helpers import token_batch

    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1), kind=kind)
    assert ensemble[0].max_positions == 128
    ids = token_batch(text, 1, 127, offset=40)
    full = generate(ensemble, ids, max_new_tokens=2, method="full")
    out = self_speculative_generate(ensemble, ids, max_new_tokens=2, draft_length=4)
    assert torch.equal(out.tokens, full.tokens)
    assert out.drafted == 1  # one token left to generate after the prompt's pass: one draft


@pytest.mark.parametrize("max_new_tokens", [2, 3, 5, 9])
def test_rows_with_less_room_than_a_draft_draft_only_what_they_can_use(max_new_tokens, text):
    ensemble = tiny_ensemble("llama-tiny", layers=(2, 2))
    ids, mask = _ragged_prompts(text, [9, 14, 5], "left")
    full = generate(ensemble, ids, mask, max_new_tokens=max_new_tokens, method="full")
    out = self_speculative_generate(ensemble, ids, mask, max_new_tokens=max_new_tokens, draft_length=4)
    assert torch.equal(out.tokens, full.tokens)
    assert out.drafted <= out.rounds * min(4, max_new_tokens - 1)  # a round drafts at most what is left
    if max_new_tokens == 2:  # one token left after the prompt's pass: one round of one draft per row
        assert out.drafted == out.rounds == 3


def test_rejected_slots_are_given_back(text):
    """At batch 1 the caches end holding exactly the tokens fed (prompt + generated but the last):
    no slot of a rejected draft is kept, so speculative timings carry no dead cache."""
    ensemble = tiny_ensemble("llama-tiny", layers=(2, 2))
    ids, mask = _ragged_prompts(text, [13], "left")
    out = self_speculative_generate(ensemble, ids, mask, max_new_tokens=20, draft_length=4)
    assert out.accepted < out.drafted  # some drafts were rejected
    assert out.cache_slots == (13 + 20 - 1,) * 2
