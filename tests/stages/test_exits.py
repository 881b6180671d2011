"""Exit rules against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_bench.stages.exits import BUILTIN_EXIT_RULES, resolve_exit_rule

# Two tokens over a vocabulary of 3; probabilities by hand.
LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))


def test_max_prob_margin_neg_entropy_by_hand():
    max_prob = resolve_exit_rule("max_prob")
    margin = resolve_exit_rule("margin")
    neg_entropy = resolve_exit_rule("neg_entropy")
    h = torch.zeros(2, 4)
    torch.testing.assert_close(max_prob(None, h, LOGITS), torch.tensor([0.5, 0.8]))
    torch.testing.assert_close(margin(None, h, LOGITS), torch.tensor([0.2, 0.7]))
    expected = torch.tensor(
        [0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2), 2 * 0.1 * math.log(0.1) + 0.8 * math.log(0.8)]
    )
    torch.testing.assert_close(neg_entropy(None, h, LOGITS), expected)


def test_shift_invariance_and_precomputed_normalizer_agree():
    logits = torch.randn(5, 11) * 4
    for name in ("max_prob", "margin", "neg_entropy"):
        fn = resolve_exit_rule(name)
        plain = fn(None, torch.zeros(5, 2), logits)
        shifted = fn(None, torch.zeros(5, 2), logits + 100.0)
        given = fn(
            None, torch.zeros(5, 2), logits, log_normalizer=torch.logsumexp(logits, -1), max_logit=logits.max(-1).values
        )
        torch.testing.assert_close(plain, shifted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain, given)


def test_bfloat16_logits_give_float32_confidence():
    fn = resolve_exit_rule("max_prob")
    out = fn(None, torch.zeros(2, 4), LOGITS.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.5, 0.8]), atol=1e-2, rtol=0)


def test_cos_sim_by_hand_and_needs_no_logits():
    fn = resolve_exit_rule("cos_sim")
    assert not fn.needs_logits and fn.needs_input_state
    h_in = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    h_out = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]])
    torch.testing.assert_close(fn(h_in, h_out, None), torch.tensor([1.0, 0.0, -1.0]))


def test_user_callable_and_its_declared_needs():
    def first_logit(h_in, h_out, logits):
        return logits[:, 0].float()

    fn = resolve_exit_rule(first_logit)
    assert fn.name == "first_logit" and fn.needs_logits and not fn.accepts_log_normalizer
    torch.testing.assert_close(fn(None, torch.zeros(2, 1), LOGITS), LOGITS[:, 0])

    def norm_rule(h_in, h_out, logits):
        return h_out.norm(dim=-1)

    norm_rule.needs_logits = False
    norm_rule.needs_input_state = False
    fn = resolve_exit_rule(norm_rule)
    assert not fn.needs_logits and not fn.needs_input_state


def test_bad_exit_rules_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown exit rule 'entropy'"):
        resolve_exit_rule("entropy")
    with pytest.raises(TypeError, match=r"exit_rule must be a name"):
        resolve_exit_rule(3)
    wrong_shape = resolve_exit_rule(lambda h_in, h_out, logits: logits)
    with pytest.raises(ValueError, match=r"one confidence per token, shape \(2,\), got \(2, 3\)"):
        wrong_shape(None, torch.zeros(2, 4), LOGITS)
    assert sorted(BUILTIN_EXIT_RULES) == ["cos_sim", "margin", "max_prob", "neg_entropy"]
