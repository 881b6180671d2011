"""Exit rules with weights: the learned classifier and cheap max-prob (low rank, candidate vocabulary)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cascade_bench import calibrate_thresholds, forward_cascade, measure_cost
from cascade_bench.measure.flops import count_pass_flops
from cascade_bench.routing.passes import stage_states
from cascade_bench.stages.exit_rules import (
    ExitClassifier,
    low_rank_max_prob,
    parse_rule_spec,
    rule_from_spec,
    top_k_max_prob,
    untrained_rule,
)
from cascade_bench.stages.exits import max_prob
from cascade_bench.stages.presets import build_blocks
from cascade_bench.stages.rule_specs import RULE_KINDS
from cascade_bench.training.persistence import load_ensemble, save_ensemble
from tests.helpers import FAMILIES, KINDS, tiny_ensemble, token_batch


def _exact_and_cheap(ensemble, rule, ids):
    states = stage_states(ensemble, ids, num_stages=1)
    hidden = states.hidden[0]
    exact = max_prob(None, hidden, ensemble[0].logits(hidden).float())
    return exact, rule(None, hidden)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_and_full_vocabulary_equal_exact_max_prob(text, family, kind):
    ensemble = tiny_ensemble(family, kind=kind)
    ids = token_batch(text, 2, 24)
    d, vocab = ensemble[0].hidden_size, ensemble.vocab_size
    with torch.no_grad():
        exact, low_rank = _exact_and_cheap(ensemble, low_rank_max_prob(ensemble[0], min(d, vocab)), ids)
        _, all_ids = _exact_and_cheap(ensemble, top_k_max_prob(ensemble[0], torch.arange(vocab)), ids)
    torch.testing.assert_close(low_rank, exact, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(all_ids, exact, atol=1e-6, rtol=1e-5)


#: Every kind of exit head a stage can have: an LLM's own, and a block's shared, own or translated one.
HEAD_KINDS = (("llm", "shared"), ("block", "shared"), ("block", "own"), ("block", "translator"))


def _with_head(kind: str, heads: str):
    """A tiny Llama cascade whose stage 0 exits through ``heads``; a translator is made non-identity
    (and an own head different from the shared one), so a rule that skips it gives other numbers."""
    if kind == "llm":
        return tiny_ensemble("llama-tiny")
    ensemble = build_blocks("llama-tiny", (2, 2), heads=heads).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        head = ensemble[0].head
        if heads == "translator":
            weight = head.translator.linear.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 4.0)
        elif heads == "own":
            head.lm_head.weight.mul_(8.0)
    return ensemble


@pytest.mark.parametrize("kind,heads", HEAD_KINDS)
def test_cheap_rules_read_the_stage_s_real_exit_head(text, kind, heads):
    """At r = min(d, V) and K = V the cheap rule is max_prob of the stage's own exit head, its translator
    included, and its MACs count the translator."""
    ensemble = _with_head(kind, heads)
    ids = token_batch(text, 2, 24)
    d, vocab = ensemble[0].hidden_size, ensemble.vocab_size
    low_rank = low_rank_max_prob(ensemble[0], min(d, vocab))
    all_ids = top_k_max_prob(ensemble[0], torch.arange(vocab))
    with torch.no_grad():
        exact, cheap_low_rank = _exact_and_cheap(ensemble, low_rank, ids)
        _, cheap_all_ids = _exact_and_cheap(ensemble, all_ids, ids)
        shared = build_blocks("llama-tiny", (2, 2)).eval()
        untranslated = _exact_and_cheap(shared, top_k_max_prob(shared[0], torch.arange(vocab)), ids)[0]
    if heads in ("translator", "own"):  # the stage's head is not the plain shared one: the test can tell
        assert ((exact - untranslated).abs() / exact).max() > 0.1
    torch.testing.assert_close(cheap_low_rank, exact, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cheap_all_ids, exact, atol=1e-6, rtol=1e-5)
    translator = d * d if heads == "translator" else 0
    assert low_rank.macs_per_token() == translator + min(d, vocab) * (d + vocab)
    assert all_ids.macs_per_token() == translator + vocab * d


def test_reduced_heads_cost_what_their_matrices_say():
    ensemble = tiny_ensemble("gpt2-tiny")
    d, vocab = ensemble[0].hidden_size, ensemble.vocab_size
    assert low_rank_max_prob(ensemble[0], 8).macs_per_token() == 8 * d + 8 * vocab
    assert top_k_max_prob(ensemble[0], list(range(0, 200, 2))).macs_per_token() == 100 * d
    assert ExitClassifier(d).macs_per_token() == d
    assert ExitClassifier(d, hidden_units=16, use_input_state=True).macs_per_token() == 2 * d * 16 + 16


def _fresh_classifier(ensemble, use_input_state=False, hidden_units=0):
    torch.manual_seed(1)
    return ExitClassifier(ensemble[0].hidden_size, hidden_units, use_input_state)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule_name", ["classifier", "classifier-mlp-input", "lowrank", "cos_sim"])
def test_rules_without_logits_run_the_head_only_for_exiting_tokens(text, kind, rule_name):
    ensemble = tiny_ensemble("gpt2-tiny", kind=kind)
    if rule_name == "classifier":
        ensemble[0].exit_rule = _fresh_classifier(ensemble)
    elif rule_name == "classifier-mlp-input":
        ensemble[0].exit_rule = _fresh_classifier(ensemble, use_input_state=True, hidden_units=8)
    elif rule_name == "lowrank":
        ensemble[0].exit_rule = low_rank_max_prob(ensemble[0], 4)
    else:
        ensemble[0].exit_rule = "cos_sim"
    ids = token_batch(text, 3, 32)
    calibrate_thresholds(ensemble, [ids], 0.5)
    d, vocab = ensemble[0].hidden_size, ensemble.vocab_size
    with torch.inference_mode():
        counted, out = count_pass_flops(lambda probe: forward_cascade(ensemble, ids, probe=probe), 2)
    exited, reached = out.tokens_exited[0], out.tokens_entered[0]
    assert 0 < exited < reached
    # Counted, not read from bookkeeping: stage 0's head ran on exactly the exiting tokens.
    assert counted.stages[0].exit_head == 2 * d * vocab * exited
    assert counted.stages[0].exit_rule == 2 * ensemble[0].exit_rule.macs_per_token * reached
    assert out.decided_tokens == (reached, 0)


@pytest.mark.parametrize("method", ["routed", "masked"])
def test_counted_flops_equal_the_analytic_count_with_a_rule_module(text, method):
    ensemble = tiny_ensemble("llama-tiny")
    ensemble[0].exit_rule = _fresh_classifier(ensemble, use_input_state=True, hidden_units=8)
    batches = [token_batch(text, 2, 32), token_batch(text, 2, 32, offset=500)]
    calibrate_thresholds(ensemble, batches, 0.4)
    record = measure_cost(ensemble, batches, method, warmup=0, repeats=1)
    assert record.flops == record.flops_analytic
    rule = ensemble[0].exit_rule.macs_per_token
    assert record.stages[0].analytic_exit_rule_flops == 2 * rule * record.stages[0].tokens_entered


def test_decision_flops_of_max_prob_are_the_heads_of_continuing_tokens(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    batches = [token_batch(text, 2, 32)]
    calibrate_thresholds(ensemble, batches, 0.5)
    record = measure_cost(ensemble, batches, "routed", warmup=0, repeats=1)
    stage0 = record.stages[0]
    continuing = stage0.tokens_entered - record.quality.tokens_exited[0]
    assert record.decision_flops == 2 * ensemble[0].hidden_size * ensemble.vocab_size * continuing
    full = measure_cost(ensemble, batches, "full", warmup=0, repeats=1)
    assert full.decision_flops == 0


@pytest.mark.parametrize("kind", KINDS)
def test_rule_modules_save_and_load_exactly(text, tmp_path, kind):
    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1, 1), kind=kind)
    ensemble[0].exit_rule = _fresh_classifier(ensemble, use_input_state=True, hidden_units=8)
    ensemble[1].exit_rule = low_rank_max_prob(ensemble[1], 5)
    ids = token_batch(text, 2, 24)
    calibrate_thresholds(ensemble, [ids], 0.5)
    save_ensemble(ensemble, tmp_path / "saved")
    loaded = load_ensemble(tmp_path / "saved")
    for before, after in zip(ensemble, loaded):
        assert after.exit_rule.name == before.exit_rule.name
        assert after.exit_rule.macs_per_token == before.exit_rule.macs_per_token
    with torch.inference_mode():
        a, b = forward_cascade(ensemble, ids), forward_cascade(loaded, ids)
    assert torch.equal(a.exit_stage, b.exit_stage)
    assert torch.equal(a.stage_confidence.nan_to_num(-1), b.stage_confidence.nan_to_num(-1))


def test_rule_modules_move_with_the_stage_and_detach_when_replaced():
    ensemble = tiny_ensemble("gpt2-tiny")
    ensemble[0].exit_rule = _fresh_classifier(ensemble)
    assert "exit_rule" in dict(ensemble[0].named_children())
    ensemble.to(torch.float64)
    assert ensemble[0].exit_rule.module.net.weight.dtype == torch.float64
    ensemble[0].exit_rule = "max_prob"
    assert "exit_rule" not in dict(ensemble[0].named_children())


def test_saved_rule_spec_rebuilds_the_same_shape():
    ensemble = tiny_ensemble("gpt2-tiny")
    for rule in (
        low_rank_max_prob(ensemble[0], 3),
        top_k_max_prob(ensemble[0], [5, 1, 7]),
        ExitClassifier(ensemble[0].hidden_size, 4, True, "correctness"),
    ):
        rebuilt = rule_from_spec(rule.spec(), ensemble[0])
        assert rebuilt.macs_per_token() == rule.macs_per_token()
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in rule.state_dict().items()
        }


def test_bad_rule_arguments_name_the_value():
    ensemble = tiny_ensemble("gpt2-tiny")
    d, vocab = ensemble[0].hidden_size, ensemble.vocab_size
    with pytest.raises(ValueError, match=rf"rank must be an int in \[1, {min(d, vocab)}\], got 0"):
        low_rank_max_prob(ensemble[0], 0)
    with pytest.raises(ValueError, match="distinct ids"):
        top_k_max_prob(ensemble[0], [1, 1, 2])
    with pytest.raises(ValueError, match=r"distinct ids in \[0, 256\)"):
        top_k_max_prob(ensemble[0], [3, 256])
    with pytest.raises(ValueError, match="'lowrank:x' needs a positive integer size"):
        parse_rule_spec("lowrank:x")
    with pytest.raises(ValueError, match="unknown exit rule 'softmax'"):
        parse_rule_spec("softmax")
    with pytest.raises(ValueError, match="target must be one of"):
        ExitClassifier(d, target="agreement")
    assert parse_rule_spec("topk:128") == (RULE_KINDS["topk"], 128)
    assert parse_rule_spec("classifier") == (RULE_KINDS["classifier"], None)
    assert math.isfinite(float(low_rank_max_prob(ensemble[0], 2).macs_per_token()))


def test_masked_pass_records_every_stage_prediction(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    ids = token_batch(text, 2, 16)
    with torch.inference_mode():
        masked = forward_cascade(ensemble, ids, method="masked", thresholds=[math.inf])
        full = forward_cascade(ensemble, ids, method="full")
        prefix = forward_cascade(ensemble, ids, method="full", num_stages=1)
    assert torch.equal(masked.stage_prediction[1], full.stage_prediction[1])
    assert torch.equal(masked.stage_prediction[0], prefix.stage_prediction[0])
    assert bool((masked.stage_prediction >= 0).all())


def test_every_spec_becomes_its_rule_in_one_place():
    """``untrained_rule``: the one constructor the sweep and the benchmarks share."""
    from cascade_bench.stages.exit_rules import ExitClassifier, ReducedHeadMaxProb, untrained_rule

    stage = tiny_ensemble("gpt2-tiny")[0]
    assert untrained_rule("cos_sim", stage) == "cos_sim"
    classifier = untrained_rule("classifier", stage)
    assert isinstance(classifier, ExitClassifier)
    assert sum(p.numel() for p in classifier.parameters()) < sum(
        p.numel() for p in untrained_rule("classifier-mlp", stage).parameters()
    )
    low = untrained_rule("lowrank:8", stage)
    assert isinstance(low, ReducedHeadMaxProb) and low.rule_name == "lowrank:8" and low.down.out_features == 8
    top = untrained_rule("topk:3", stage, candidate_ids=torch.tensor([7, 2, 9, 4]))
    head = stage.lm_head.weight
    assert top.rule_name == "topk:3"
    torch.testing.assert_close(top.up.weight, head[[7, 2, 9]])  # the first 3 candidates' rows of the head
    with pytest.raises(ValueError, match="unknown exit rule 'nope'"):
        untrained_rule("nope", stage)


def test_every_rule_kind_builds_a_rule_and_says_what_it_is():
    """The registry is the one place a kind is described: each builds, and each answers the questions
    the sweep, the config and the cost model ask (trained? approximates max_prob? what bounds a size?)."""
    stage = tiny_ensemble("gpt2-tiny")[0]
    for name, kind in RULE_KINDS.items():
        spec = f"{name}:4" if kind.size else name
        rule = untrained_rule(spec, stage)
        assert (rule == name) if kind.family == "builtin" else isinstance(rule, nn.Module), name
        assert kind.trained == isinstance(rule, ExitClassifier), name
        assert kind.approximates_max_prob == (kind.family in ("low_rank_head", "top_k_head")), name
    assert RULE_KINDS["lowrank"].misfit(17, hidden_size=16, vocab_size=300) == (
        "'lowrank:17' needs a rank in [1, 16] (the smaller of the hidden size 16 and the vocabulary 300)"
    )
    assert RULE_KINDS["topk"].misfit(300, hidden_size=16, vocab_size=300) is None
    assert RULE_KINDS["max_prob"].misfit(None, hidden_size=16, vocab_size=300) is None
    with pytest.raises(ValueError, match=r"unknown exit rule 'lowrnk:4'; expected one of .*'lowrank:R'"):
        parse_rule_spec("lowrnk:4")
    with pytest.raises(ValueError, match=r"holds a comma; give several rules space-separated \(`--exit-rules max_prob"):
        parse_rule_spec("max_prob,cos_sim")
