"""K/V policies (invariant 4 per policy, cache contents, counted == analytic FLOPs) and batch exit
policies of early-exit generation."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_bench.measure.analytic import exit_rule_macs, routed_cost
from cascade_bench.measure.flops import count_pass_flops
from cascade_bench.routing.generation import generate
from cascade_bench.routing.passes import forward_cascade
from tests.helpers import FAMILIES, KINDS, tiny_ensemble, token_batch
from tests.routing.test_generation import _median_threshold, _ragged_prompts

NEW = 8
POLICIES = ("propagate", "recompute")


def _teacher_forced(ensemble, ids, mask, generated, thresholds, kv_policy):
    rows = [torch.cat([ids[i][mask[i].bool()], generated[i]]) for i in range(ids.shape[0])]
    width = max(r.numel() for r in rows)
    full = torch.zeros(len(rows), width, dtype=torch.long)
    full_mask = torch.zeros_like(full)
    for i, r in enumerate(rows):
        full[i, : r.numel()], full_mask[i, : r.numel()] = r, 1
    with torch.inference_mode():
        return forward_cascade(ensemble, full, full_mask, thresholds=thresholds, kv_policy=kv_policy)


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kv_policy", POLICIES)
@pytest.mark.parametrize("exit_rule", ["max_prob", "cos_sim"])
def test_invariant_4_holds_per_kv_policy(kv_policy, kind, preset, exit_rule, text):
    ensemble = tiny_ensemble(preset, layers=(2, 2, 2), exit_rule=exit_rule, kind=kind)
    lengths = [9, 14, 5, 11]
    ids, mask = _ragged_prompts(text, lengths, "left")
    threshold = _median_threshold(ensemble, ids, mask)
    out = generate(ensemble, ids, mask, max_new_tokens=NEW, thresholds=[threshold, threshold], kv_policy=kv_policy)
    tf = _teacher_forced(ensemble, ids, mask, out.tokens, [threshold, threshold], kv_policy)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(tf.nll[i, n - 1 : n - 1 + NEW], out.nll[i], atol=1e-4, rtol=0)
        assert torch.equal(tf.exit_stage[i, n - 1 : n - 1 + NEW], out.exit_stage[i])
        fed = n + NEW - 1
        stages = tf.exit_stage[i, :fed]
        for k in range(1, 3):
            if kv_policy == "propagate":  # every fed token holds a slot in every stage
                expected = fed
            else:  # the prefix up to the row's last token that reached stage k; the rest is pending
                reached = (stages >= k).nonzero()
                expected = int(reached[-1]) + 1 if reached.numel() else 0
            assert int(out.cache_lengths[k][i]) == expected
    # The sequences mix exits and continuations, so the policy had exited tokens to handle.
    assert 0 < tf.tokens_exited[0] < tf.num_tokens
    moved = tf.propagated_tokens if kv_policy == "propagate" else tf.recomputed_tokens
    assert sum(moved) > 0


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kv_policy", ("absent",) + POLICIES)
def test_counted_flops_of_each_kv_policy_equal_the_analytic_count(kv_policy, kind, preset, text):
    ensemble = tiny_ensemble(preset, layers=(2, 2, 2), kind=kind)
    ids = token_batch(text, 3, 16)
    threshold = _median_threshold(ensemble, ids)
    with torch.inference_mode():
        counted, out = count_pass_flops(
            lambda probe: forward_cascade(
                ensemble, ids, thresholds=[threshold, threshold], kv_policy=kv_policy, probe=probe
            ),
            3,
        )
    analytic = routed_cost(
        [s.config for s in ensemble],
        out.stage_batch_shapes,
        out.head_tokens,
        exit_rule_macs(list(ensemble), out.decided_tokens),
        out.propagated_tokens,
    )
    assert [c.total for c in counted.stages] == [a.total for a in analytic]
    if kv_policy == "recompute":
        assert (
            sum(out.recomputed_tokens) > 0
            and out.layer_cost > forward_cascade(ensemble, ids, thresholds=[threshold, threshold]).layer_cost
        )
    if kv_policy == "propagate":
        # Every token that exited at stage e has its K/V in each later stage: stage 2 gets stage 0's and 1's.
        assert out.propagated_tokens == (0, out.tokens_exited[0], out.tokens_exited[0] + out.tokens_exited[1])


@pytest.mark.parametrize("kv_policy", ("absent",) + POLICIES)
def test_no_exit_is_full_depth_under_every_kv_policy(kv_policy, text):
    ensemble = tiny_ensemble("llama-tiny")
    ids = token_batch(text, 2, 12)
    with torch.inference_mode():
        full = forward_cascade(ensemble, ids, method="full")
        routed = forward_cascade(ensemble, ids, thresholds=[math.inf], kv_policy=kv_policy)
    torch.testing.assert_close(routed.nll, full.nll, atol=1e-5, rtol=0)


def test_kv_policy_input_errors(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    ids = token_batch(text, 2, 8)
    with pytest.raises(ValueError, match="kv_policy must be one of"):
        forward_cascade(ensemble, ids, kv_policy="lazy")
    with pytest.raises(ValueError, match="kv_policy='recompute' needs method='routed', batching='padded'"):
        forward_cascade(ensemble, ids, kv_policy="recompute", batching="bucketed")
    with pytest.raises(ValueError, match="kv_policy must be one of"):
        generate(ensemble, ids, kv_policy="copy")


@pytest.mark.parametrize("kind", KINDS)
def test_batch_policy_with_all_rows_confident_is_per_token(kind, text):
    ensemble = tiny_ensemble("gpt2-tiny", kind=kind)
    ids, mask = _ragged_prompts(text, [7, 10, 4], "left")
    a = generate(ensemble, ids, mask, max_new_tokens=NEW, thresholds=[-math.inf])
    b = generate(ensemble, ids, mask, max_new_tokens=NEW, thresholds=[-math.inf], exit_policy="batch", quorum=1.0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exit_stage, b.exit_stage)
    assert (b.stage_rows[:, 1] == 0).all() and (b.stage_rows[:, 0] == 3).all()


def test_batch_policy_never_splits_a_step_and_follows_the_quorum(text):
    ensemble = tiny_ensemble("llama-tiny")
    ids, mask = _ragged_prompts(text, [9, 14, 5, 11], "left")
    threshold = _median_threshold(ensemble, ids, mask)
    per_token = generate(ensemble, ids, mask, max_new_tokens=12, thresholds=[threshold])
    # Some decode step split the rows under per_token (else this test shows nothing).
    assert ((per_token.stage_rows[:, 1] > 0) & (per_token.stage_rows[:, 1] < 4)).any()
    for quorum in (1.0, 0.5, 0.25):
        out = generate(
            ensemble, ids, mask, max_new_tokens=12, thresholds=[threshold], exit_policy="batch", quorum=quorum
        )
        assert set(out.stage_rows[:, 1].tolist()) <= {0, 4}  # all rows exit together or none do
        decode = out.exit_stage[:, 1:]  # the first token comes from the prompt
        assert ((decode == 0).all(dim=0) | (decode == 1).all(dim=0)).all()
    # quorum 1: a step exits only if every row is confident, so never more exits than per_token rows agree on.
    strict = generate(ensemble, ids, mask, max_new_tokens=12, thresholds=[threshold], exit_policy="batch")
    lenient = generate(ensemble, ids, mask, max_new_tokens=12, thresholds=[threshold], exit_policy="batch", quorum=0.25)
    assert strict.exit_counts[0] <= lenient.exit_counts[0]


def test_schedule_policy_exits_where_the_schedule_says(text):
    ensemble = tiny_ensemble("gpt_neox-tiny", layers=(2, 2, 2))
    ids, mask = _ragged_prompts(text, [6, 9], "left")
    schedule = [2, 2, 1, 1, 1, 0]
    out = generate(ensemble, ids, mask, max_new_tokens=10, exit_policy="schedule", exit_schedule=schedule)
    expected = [2] + [schedule[min(i, len(schedule) - 1)] for i in range(9)]  # the prompt's token at full depth
    assert out.exit_stage.tolist() == [expected, expected]
    # No exit rule ran and no cache misses an entry that a later token needs: stage k holds what reached it.
    assert [int(c[0]) for c in out.cache_lengths] == [6 + 9, 6 + 5, 6 + 2]
    with pytest.raises(ValueError, match="exit_schedule must be non-increasing"):
        generate(ensemble, ids, mask, exit_policy="schedule", exit_schedule=[0, 1])
    with pytest.raises(ValueError, match=r"exit_schedule holds stage indices in \[0, 3\)"):
        generate(ensemble, ids, mask, exit_policy="schedule", exit_schedule=[3])
    with pytest.raises(ValueError, match="needs exit_schedule"):
        generate(ensemble, ids, mask, exit_policy="schedule")
    with pytest.raises(ValueError, match="exit_policy must be one of"):
        generate(ensemble, ids, mask, exit_policy="rows")
    with pytest.raises(ValueError, match=r"quorum must be a fraction in \(0, 1\]"):
        generate(ensemble, ids, mask, exit_policy="batch", quorum=0)


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_recompute_equals_masked_early_exit_where_tokens_exit(kind, preset, text):
    """Under ``recompute`` a later stage runs over every earlier token of the row at its original
    position, which is the context masked early exit gives every token: same NLL, same exits."""
    ensemble = tiny_ensemble(preset, layers=(2, 2, 2), kind=kind)
    ids, mask = _ragged_prompts(text, [9, 14, 5, 11], "right")
    threshold = _median_threshold(ensemble, ids, mask)
    with torch.inference_mode():
        recomputed = forward_cascade(ensemble, ids, mask, thresholds=[threshold, threshold], kv_policy="recompute")
        masked = forward_cascade(ensemble, ids, mask, thresholds=[threshold, threshold], method="masked")
    assert 0 < recomputed.tokens_exited[0] < recomputed.num_tokens and sum(recomputed.recomputed_tokens) > 0
    assert torch.equal(recomputed.exit_stage, masked.exit_stage)
    real = mask.bool()
    torch.testing.assert_close(recomputed.nll[real], masked.nll[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_policy", ("absent",) + POLICIES)
def test_padding_waste_counts_only_padding(kv_policy, text):
    """Padding waste = slots computed that hold no real work; a recomputed token is real work."""
    ensemble = tiny_ensemble("llama-tiny", layers=(2, 2, 2))
    ids, mask = _ragged_prompts(text, [9, 14, 5, 11], "right")
    threshold = _median_threshold(ensemble, ids, mask)
    with torch.inference_mode():
        out = forward_cascade(ensemble, ids, mask, thresholds=[threshold, threshold], kv_policy=kv_policy)
    assert 0 < out.tokens_exited[0] < out.num_tokens
    for k, (slots, shapes) in enumerate(zip(out.slots_computed, out.stage_batch_shapes)):
        assert slots == sum(rows * length for rows, length, *_ in shapes)
        real_work = out.tokens_entered[k] + (out.recomputed_tokens[k] if out.recomputed_tokens else 0)
        assert out.padding_waste[k] == pytest.approx((slots - real_work) / slots if slots else 0.0)
        assert 0.0 <= out.padding_waste[k] < 1.0
