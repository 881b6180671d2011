"""The decoding benchmark's arithmetic, derived by hand: the predicted speedup, the bootstrap
interval, and a row's speedup, same tokens, floor multiple and realisation from known calls."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_bench.bench.decode_suite import bootstrap_interval, left_padded, predicted_speedup, summarise
from cascade_bench.bench.hf_generate import Call
from cascade_bench.data.prompt_suite import Prompt


def test_predicted_speedup_is_expected_tokens_per_round_over_the_round_s_cost():
    # a = 0.5, k = 2: 1 + 0.5 + 0.25 = 1.75 tokens; 2 draft calls at 0.1 plus a verification at 1.0
    assert predicted_speedup(0.5, 2, 0.1, 2, 1.0) == pytest.approx(1.75 / 1.2)
    assert predicted_speedup(1.0, 3, 0.0, 3, 1.0) == 4.0  # every proposal accepted: k + 1 tokens
    assert predicted_speedup(0.0, 2, math.nan, 0, 1.05) == pytest.approx(1 / 1.05)  # lookup: no draft calls
    assert math.isnan(predicted_speedup(math.nan, 2, 0.1, 2, 1.0))
    # self-speculation's round yields at most its k drafts: (1 - a^k) / (1 - a) tokens
    assert predicted_speedup(0.5, 2, 0.1, 2, 1.0, bonus=False) == pytest.approx(1.5 / 1.2)
    assert predicted_speedup(1.0, 3, 0.0, 3, 1.0, bonus=False) == 3.0


def test_bootstrap_interval_resamples_prompts_for_the_ratio_of_summed_seconds():
    assert all(math.isnan(x) for x in bootstrap_interval([1.0], [2.0]))  # one call: no interval
    assert bootstrap_interval([1.0, 2.0], [2.0, 4.0]) == (2.0, 2.0)  # every resample: 2x
    low, high = bootstrap_interval([1.0, 1.0, 1.0, 1.0], [1.0, 1.2, 1.4, 1.6])
    assert 1.0 <= low < 1.3 < high <= 1.6  # the point estimate, 5.2 / 4 = 1.3, lies inside
    assert bootstrap_interval([1.0, 1.0, 1.0, 1.0], [1.0, 1.2, 1.4, 1.6]) == (low, high)  # fixed seed


def test_left_padding_puts_every_prompt_at_the_right_edge():
    ids, mask = left_padded([Prompt("s", "a", (5, 6, 7)), Prompt("s", "b", (8,))], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _call(seconds, tokens, **counts):
    return Call(seconds=seconds, tokens=torch.tensor(tokens), token_seconds=[seconds / len(tokens[0])] * 4, **counts)


def test_a_row_s_figures_follow_from_its_calls():
    plain = [_call(2.0, [[1, 2, 3, 4]]), _call(4.0, [[5, 6, 7, 8]])]  # 8 tokens in 6 s: 0.75 s per step
    spec = [
        _call(
            1.0,
            [[1, 2, 3, 9]],
            proposed=4,
            accepted=2,
            rejections=1,
            rounds=2,
            loop_rounds=2,
            emitted=4,
            draft_calls=4,
            draft_seconds=0.3,
            verify_seconds=0.6,
            speculative=True,
        ),
        _call(
            2.0,
            [[5, 6, 7, 8]],
            proposed=4,
            accepted=2,
            rejections=1,
            rounds=2,
            loop_rounds=2,
            emitted=4,
            draft_calls=4,
            draft_seconds=0.3,
            verify_seconds=0.9,
            speculative=True,
        ),
    ]
    floor = {"step_floor_s": 0.25}
    row = summarise("ours-draft", 1, "code", spec, "ours-greedy", plain, plain, plain, floor, 1e9)
    assert row.tokens_per_s == pytest.approx(8 / 3.0)
    assert row.speedup == pytest.approx((8 / 3.0) / (8 / 6.0))
    assert row.speedup_interval == (2.0, 2.0)  # each prompt ran twice as fast
    assert row.same_tokens == 7 / 8
    assert row.floor_multiple == pytest.approx((3.0 / 8) / 0.25)
    assert row.acceptance == 0.5 and row.proposals_per_round == 2.0 and row.tokens_per_round == 2.0
    # 4 accepted, 2 rounds with a rejection: the real model judged 6 proposals, accepting 4
    assert row.acceptance_per_position == pytest.approx(4 / 6)
    assert row.draft_calls_per_round == 2.0
    assert row.draft_cost == pytest.approx((0.6 / 8) / 0.75) and row.verify_cost == pytest.approx((1.5 / 4) / 0.75)
    a = 4 / 6
    expected = (1 - a**3) / (1 - a) / (2 * row.draft_cost + row.verify_cost)
    assert row.predicted_speedup == pytest.approx(expected)
    assert row.realisation == pytest.approx(2.0 / expected)
    plain_row = summarise("ours-greedy", 1, "code", plain, "ours-greedy", plain, plain, plain, floor, math.nan)
    assert plain_row.speedup == 1.0 and plain_row.same_tokens == 1.0 and math.isnan(plain_row.acceptance)


def test_greedy_agreement_of_the_real_model_with_itself_is_one(text):
    from cascade_bench.bench.decode_suite import greedy_agreement
    from cascade_bench.routing.generation import generate
    from cascade_bench.stages.ensemble import Ensemble
    from tests.helpers import tiny_ensemble, token_batch

    target = tiny_ensemble("llama-tiny", layers=(3,))[0]
    ids = token_batch(text, 2, 12)
    batches = [(ids[i : i + 1], torch.ones(1, 12, dtype=torch.long)) for i in range(2)]
    calls = []
    for one, mask in batches:
        out = generate(Ensemble([target]), one, mask, max_new_tokens=6, method="full")
        calls.append(Call(seconds=1.0, tokens=out.tokens))
    assert greedy_agreement(target, None, batches, calls) == 1.0
    # over a vocabulary that lacks every greedy token, nothing agrees
    used = torch.cat([c.tokens for c in calls]).unique()
    others = torch.tensor([i for i in range(target.vocab_size) if i not in set(used.tolist())])
    assert greedy_agreement(target, others, batches, calls) == 0.0


def test_whole_suite_rows_sum_every_set_against_the_baseline_fastest_over_the_suite():
    from cascade_bench.bench.decode_suite import DecodeRow, whole_suite_rows

    def row(method, prompt_set, seconds, same=1.0):
        return DecodeRow(
            method, 1, prompt_set, len(seconds), 0.0, 0.0, (0, 0), "", same, 0.0, 0.0, per_prompt_seconds=seconds
        )

    rows = [
        row("ours-greedy", "a", [2.0, 2.0]),
        row("hf-greedy", "a", [1.0, 1.0]),  # hf faster on set a
        row("ours-greedy", "b", [2.0, 2.0]),
        row("hf-greedy", "b", [4.0, 4.0]),  # ours faster on b
        row("ours-draft", "a", [1.0, 1.0], same=0.5),
        row("ours-draft", "b", [1.0, 1.0]),
        row("hf-early-exit", "a", [5.0]),
        row("hf-early-exit", "b", [6.0]),  # capped: first call of each
    ]
    suite = {r.method: r for r in whole_suite_rows(rows, new_tokens=10)}
    # over the whole suite ours-greedy takes 8 s, hf-greedy 10 s: ours is the baseline
    assert {r.baseline for r in suite.values()} == {"ours-greedy"}
    assert suite["ours-draft"].speedup == 8.0 / 4.0 and suite["ours-draft"].tokens_per_s == 40 / 4.0
    assert suite["ours-draft"].same_tokens == 0.75  # 20 tokens at 0.5, 20 at 1.0
    assert suite["hf-early-exit"].speedup == (2.0 + 2.0) / (5.0 + 6.0)  # against the baseline's first calls
    assert suite["hf-greedy"].speedup == 8.0 / 10.0
