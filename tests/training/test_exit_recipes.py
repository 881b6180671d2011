"""Exit recipes on a tiny Llama, by hand: the top-k KL is zero when student equals teacher and equals
its hand-computed value otherwise; every recipe starts exactly at the least-squares translators'
predictions (the added branches are zero); the zero-initialised adapter and MLP exit start as their
translator; LoRA starts as the identity, never changes the base weights and comes out cleanly; the
distillation term is zero before LoRA is trained; early stopping keeps the best check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cascade_bench.stages.blocks import Translator
from cascade_bench.stages.exit_adapters import AttentionAdapter, MLPExit
from cascade_bench.training.exit_recipe_specs import EXIT_RECIPES, RecipeBudget, check_recipes
from cascade_bench.training.exit_recipes import FINAL_WEIGHT, build_recipe, evaluate_recipe, step_loss, train_recipe
from cascade_bench.training.exit_translators import fit_translators_lstsq, new_translators
from cascade_bench.training.lora import add_lora, lora_norm, lora_parameters, remove_lora
from cascade_bench.training.topk_kl import log1mexp, topk_kl
from cascade_bench.training.window_states import collect_window_states, token_windows
from tests.helpers import tiny_ensemble

LAYERS = (1, 2, 3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_ensemble("llama-tiny", layers=(4,))[0].model.eval()


@pytest.fixture(scope="module")
def stream(text):
    return torch.tensor(list(text.encode("utf-8")[:12_000]), dtype=torch.long)


@pytest.fixture(scope="module")
def states(model, stream):
    train = collect_window_states(model, token_windows(stream, 16, 1024, 4), LAYERS, 8)
    validation = collect_window_states(model, token_windows(stream[8000:], 16, 256, 4), LAYERS, 8)
    return train, validation


@pytest.fixture(scope="module")
def fitted(model, states):
    train, validation = states
    translators = new_translators(model, LAYERS)
    fit_translators_lstsq(model, translators, train.as_layer_states(), validation.as_layer_states())
    return {layer: translators[str(layer)].eval() for layer in LAYERS}


# -- the loss ------------------------------------------------------------------------------------------


def test_the_top_k_kl_is_zero_when_the_student_is_the_teacher():
    logits = torch.randn(5, 7, 50)
    top = logits.log_softmax(-1).topk(4, dim=-1)
    kl = topk_kl(logits, top.values, top.indices)
    assert kl.shape == (5, 7)
    torch.testing.assert_close(kl, torch.zeros_like(kl), atol=1e-6, rtol=0)
    assert bool((topk_kl(torch.randn(5, 7, 50), top.values, top.indices) > 0).all())


def test_the_top_k_kl_folds_the_rest_of_the_vocabulary_into_one_outcome():
    # teacher p = (0.5, 0.3, 0.2), top-1 kept: outcomes {id 0: 0.5, rest: 0.5}; student q = (0.25, 0.25, 0.5):
    # {id 0: 0.25, rest: 0.75}. KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    student = torch.tensor([[0.25, 0.25, 0.5]]).log()
    kl = topk_kl(student, torch.tensor([[math.log(0.5)]]), torch.tensor([[0]]))
    assert float(kl) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), abs=1e-6)
    assert float(log1mexp(torch.tensor(math.log(0.25)))) == pytest.approx(math.log(0.75), abs=1e-7)
    with pytest.raises(ValueError, match="same leading dims"):
        topk_kl(torch.zeros(2, 3), torch.zeros(3, 1), torch.zeros(3, 1, dtype=torch.long))


# -- the modules ---------------------------------------------------------------------------------------


def test_the_mlp_exit_and_the_attention_adapter_start_as_their_translator(model):
    torch.manual_seed(1)
    translator = Translator(model.config.hidden_size)
    nn.init.normal_(translator.linear.weight, std=0.1)
    hidden = torch.randn(2, 9, model.config.hidden_size)
    with torch.no_grad():
        expected = translator(hidden)
        torch.testing.assert_close(MLPExit(translator, 24)(hidden), expected, atol=0, rtol=0)
        adapter = AttentionAdapter(model, 2, translator)
        torch.testing.assert_close(adapter(hidden, torch.ones(2, 9, dtype=torch.long)), expected, atol=1e-6, rtol=0)
    # its layer is a copy: training it leaves the model's own layer alone
    original = model.model.layers[2].self_attn.q_proj.weight.clone()
    adapter.layer.self_attn.q_proj.weight.data.add_(1.0)
    assert torch.equal(model.model.layers[2].self_attn.q_proj.weight, original)
    with pytest.raises(ValueError, match="adapter layer must be an int in \\[0, 4\\), got 4"):
        AttentionAdapter(model, 4, translator)


def test_a_trained_attention_adapter_is_causal(model):
    torch.manual_seed(2)
    adapter = AttentionAdapter(model, 1, Translator(model.config.hidden_size))
    nn.init.normal_(adapter.layer.self_attn.o_proj.weight, std=0.2)
    hidden = torch.randn(1, 8, model.config.hidden_size)
    changed = hidden.clone()
    changed[:, 5:] += 1.0
    mask = torch.ones(1, 8, dtype=torch.long)
    with torch.no_grad():
        before, after = adapter(hidden, mask), adapter(changed, mask)
    torch.testing.assert_close(before[:, :5], after[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_lora_starts_as_the_identity_trains_only_its_factors_and_comes_out(model, stream):
    ids = stream[:32].reshape(2, 16)
    base = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    adapters = add_lora(model, rank=2, alpha=4.0)
    try:
        assert len(adapters) == 4 * 7 and lora_norm(adapters) == 0.0
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)
        optimizer = torch.optim.AdamW(lora_parameters(adapters), lr=1e-2)
        for _ in range(3):
            loss = model(input_ids=ids).logits.log_softmax(-1)[..., 0].mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert lora_norm(adapters) > 0
        with torch.no_grad():
            assert not torch.allclose(model(input_ids=ids).logits, expected)
        for adapter in adapters:
            assert adapter.base.weight.grad is None and not adapter.base.weight.requires_grad
    finally:
        assert remove_lora(model) == 4 * 7
    assert all(torch.equal(base[name], value) for name, value in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="LoRA rank must be an int in \\[1, "):
        add_lora(model, rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="no linear layer of"):
        add_lora(model, rank=2, alpha=1.0, targets=("nothing",))


# -- the recipes ---------------------------------------------------------------------------------------


def test_every_recipe_starts_at_the_least_squares_predictions(model, states, fitted):
    _, validation = states
    start = evaluate_recipe(build_recipe("lstsq", model, LAYERS, fitted), validation)
    for name in EXIT_RECIPES[1:]:
        recipe = build_recipe(name, model, LAYERS, fitted)
        try:
            curve = evaluate_recipe(recipe, validation)
            assert [p.agreement for p in curve] == [p.agreement for p in start], name
            for got, want in zip(curve, start):
                assert got.ppl == pytest.approx(want.ppl, rel=1e-5), name
        finally:
            recipe.close()


def test_the_lora_recipe_s_distillation_term_is_zero_before_training(model, states, fitted):
    train, _ = states
    recipe = build_recipe("lora", model, LAYERS, fitted)
    try:
        batch = train.rows(torch.arange(2))
        with torch.no_grad():
            exit_only = step_loss(build_recipe("lstsq", model, LAYERS, fitted), batch, 2)[0]
            with_final = step_loss(recipe, batch, 2)[0]
        # student = teacher at full depth: the final term adds nothing
        torch.testing.assert_close(with_final, exit_only, atol=1e-5, rtol=0)
        assert FINAL_WEIGHT > 0
    finally:
        recipe.close()


@pytest.mark.parametrize("name", EXIT_RECIPES[1:])
def test_training_keeps_the_best_check_and_leaves_the_base_model_alone(model, states, fitted, name):
    train, validation = states
    base = {key: value.clone() for key, value in model.state_dict().items()}
    budget = RecipeBudget(
        train_tokens=1024, validation_tokens=256, seconds=30.0, window=16, batch_windows=4, steps_per_check=4,
        patience=2, top_k=8,
    )  # fmt: skip
    recipe = build_recipe(name, model, LAYERS, fitted)
    try:
        history = train_recipe(recipe, train, validation, budget, progress=False)
        per_check = history.validation_agreement
        assert history.tokens_seen[0] == 0 and len(per_check) >= 2 and history.layers == LAYERS
        kept = [p.agreement for p in evaluate_recipe(recipe, validation)]
        if name == "lora":  # one trunk: one check kept for every layer, the best on the mean
            means = history.mean_agreement
            assert set(history.best_checks) == {max(range(len(means)), key=lambda i: (means[i], -i))}
        for i, check in enumerate(history.best_checks):
            column = [agreements[i] for agreements in per_check]
            if name != "lora":  # each layer its own best check, never below its start
                assert check == max(range(len(column)), key=lambda c: (column[c], -c))
                assert kept[i] >= column[0]
            assert kept[i] == pytest.approx(column[check], abs=1e-9)
        assert history.trainable_parameters > 0 and history.stop_reason in ("early stopping", "time budget")
    finally:
        recipe.close()
    assert all(torch.equal(base[key], value) for key, value in model.state_dict().items())


def test_the_budget_and_the_recipe_names_are_checked():
    assert check_recipes(["lora", "lstsq"]) == ("lstsq", "lora")
    with pytest.raises(ValueError, match="exit recipes must be some of"):
        check_recipes(["tuned-lens"])
    scaled = RecipeBudget().scaled(0.5)
    assert scaled.train_tokens == RecipeBudget().train_tokens // 2 and scaled.seconds == RecipeBudget().seconds / 2
    with pytest.raises(ValueError, match="--budget must be a positive number, got 0"):
        RecipeBudget().scaled(0)
    with pytest.raises(ValueError, match="recipe budget validation_tokens \\(100\\) must hold one window of 512"):
        RecipeBudget(validation_tokens=100)
    with pytest.raises(ValueError, match="recipe budget top_k must be an int in \\[1, 1024\\], got 0"):
        RecipeBudget(top_k=0)


def test_the_check_cap_stops_training_and_says_so(model, states, fitted):
    train, validation = states
    budget = RecipeBudget(
        train_tokens=1024, validation_tokens=256, seconds=600.0, window=16, batch_windows=4, steps_per_check=2,
        patience=50, top_k=8, max_checks=2,
    )  # fmt: skip
    history = train_recipe(build_recipe("lstsq+kl", model, LAYERS, fitted), train, validation, budget, progress=False)
    assert history.stop_reason == "check cap" and not history.converged
    assert len(history.tokens_seen) == 3 and history.tokens_seen[-1] == 2 * 2 * len(LAYERS) * 4 * 16
    with pytest.raises(ValueError, match="max_checks must be None or a positive int, got 0"):
        RecipeBudget(max_checks=0)
