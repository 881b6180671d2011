"""The oracle bound: hand-derived exits, and tokens a batch does not score routed by their true next token."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_bench.data.batch import IGNORE_INDEX, next_token_targets
from cascade_bench.routing.oracle import oracle_bound, routing_targets
from cascade_bench.routing.passes import forward_cascade
from tests.helpers import KINDS, tiny_ensemble, token_batch


def _stage_nll(ensemble, ids):
    """(S, B, T) float64 NLL of every token's next token at every stage (no exit)."""
    with torch.inference_mode():
        out = forward_cascade(ensemble, ids, None, None, method="masked", thresholds=[math.inf] * len(ensemble))
    return out.stage_nll.double(), out.scored


@pytest.mark.parametrize("kind", KINDS)
def test_each_token_exits_at_the_first_stage_within_tolerance(text, kind):
    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1, 2), kind=kind)
    ids = token_batch(text, 2, 24)
    nll, scored = _stage_nll(ensemble, ids)
    for tolerance in (0.0, 0.3):
        result = oracle_bound(ensemble, [ids], tolerance=tolerance)
        # by hand: the first stage whose NLL is within the tolerance of the last; the last row has no target
        exit_stage = torch.full(ids.shape, 2)
        for k in (1, 0):
            exit_stage = torch.where(nll[k] <= nll[2] + tolerance, torch.tensor(k), exit_stage)
        exit_stage[~scored] = 2
        entered = tuple(int((exit_stage >= k).sum()) for k in range(3))
        assert result.tokens_entered == entered
        assert result.exit_ratios == tuple(int((exit_stage == k).sum()) / ids.numel() for k in range(3))
        assert result.layer_cost == pytest.approx(sum(n * l for n, l in zip(entered, (1, 1, 2))) / (ids.numel() * 4))
        chosen = nll.gather(0, exit_stage[None]).squeeze(0)
        assert result.tokens == int(scored.sum())
        assert result.ppl == pytest.approx(math.exp(float(chosen[scored].mean())), rel=1e-9)


def test_unscored_tokens_are_routed_by_their_true_next_token(text):
    """A token the batch does not score (a sliding window's repeated context) is routed exactly as it
    would be if it were scored; only the PPL and the scored-token count change. Before: by the NLL of id 0."""
    ensemble = tiny_ensemble("llama-tiny", layers=(1, 2))
    ids = token_batch(text, 2, 32)
    every = next_token_targets(ids)
    context = every.clone()
    context[:, :16] = IGNORE_INDEX  # the first half repeats the previous window: not scored
    all_scored = oracle_bound(ensemble, [(ids, None, every)])
    half = oracle_bound(ensemble, [(ids, None, context)])
    assert half.tokens_entered == all_scored.tokens_entered
    assert half.exit_ratios == all_scored.exit_ratios
    assert half.flops_analytic == all_scored.flops_analytic
    assert half.layer_cost == all_scored.layer_cost
    assert half.tokens == int((context >= 0).sum()) < all_scored.tokens
    # only the placeholder changes: nothing else does
    other = context.masked_fill(context < 0, -1)
    assert oracle_bound(ensemble, [(ids, None, other)]) == half


def test_an_unscored_token_without_a_next_token_follows_the_full_depth(text):
    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1))
    ids = token_batch(text, 1, 16)
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0  # right padding: token 11 is the row's last real token
    targets = next_token_targets(ids, mask)
    assert int(targets[0, 11]) == IGNORE_INDEX
    route = routing_targets(ids, mask, targets)
    assert torch.equal(route, targets)
    result = oracle_bound(ensemble, [(ids, mask, targets)])
    nll, _ = _stage_nll(ensemble, ids[:, :12])
    first = torch.where(nll[0, 0, :11] <= nll[1, 0, :11], 0, 1)
    assert result.tokens_entered == (12, int((first == 1).sum()) + 1)


def test_no_scored_token_is_refused(text):
    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1))
    ids = token_batch(text, 1, 8)
    with pytest.raises(ValueError, match="no scored token"):
        oracle_bound(ensemble, [(ids, None, torch.full_like(ids, IGNORE_INDEX))])
