"""Exit translators: identity at first, trained with the model frozen, better than the shared head
on the tokens they trained on, and usable as the exit heads of blocks."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from cascade_bench import Ensemble
from cascade_bench.measure.layer_exits import collect_layer_states, exit_curve, shared_head
from cascade_bench.routing.passes import forward_cascade
from cascade_bench.stages.presets import stage_config
from cascade_bench.training.exit_translators import new_translators, translated_head
from tests.helpers import token_batch


def _setup(text):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(stage_config("llama-tiny", num_hidden_layers=4)).eval()
    ids = token_batch(text, 4, 24, offset=10)
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    states = collect_layer_states(model, [{"input_ids": ids, "targets": targets}], [1, 2, 3])
    return model, states


def test_translators_start_as_the_shared_head(text):
    model, states = _setup(text)
    translators = new_translators(model, states.layers, rank=4)
    before = exit_curve(states, translated_head(model, {int(k): t for k, t in translators.items()}))
    shared = exit_curve(states, shared_head(model))
    assert [p.ppl for p in before] == [p.ppl for p in shared]


def test_trained_translators_are_the_blocks_exit_heads(text):
    model, states = _setup(text)
    translators = new_translators(model, states.layers)
    with torch.no_grad():
        translators["2"].linear.weight.normal_(0, 0.1)
    blocks = Ensemble.from_blocks(model, [2], heads="translator")
    blocks[0].head.translator.load_state_dict(translators["2"].state_dict())
    ids = token_batch(text, 4, 24, offset=10)
    with torch.inference_mode():
        out = forward_cascade(blocks, ids, thresholds=[-float("inf")], return_logits=True)  # everyone exits at 2
        direct = exit_curve(states, translated_head(model, {int(k): t for k, t in translators.items()}))[1]
    assert torch.equal(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).argmax(-1), direct.argmax)


def test_least_squares_recovers_an_affine_map_of_the_stream(text):
    """When the last layer's stream is exactly an affine map of layer 1's, the fit finds it."""
    from dataclasses import replace

    from cascade_bench.training.exit_translators import fit_translators_lstsq

    model, states = _setup(text)
    d = model.config.hidden_size
    generator = torch.Generator().manual_seed(1)
    matrix = torch.eye(d) + 0.1 * torch.randn(d, d, generator=generator)
    shift = torch.randn(d, generator=generator)
    first = states.states[:, 0]
    train = replace(states, layers=(1,), states=states.states[:, :1], final_states=first @ matrix + shift)
    translators = new_translators(model, (1,))
    fit_translators_lstsq(model, translators, train, replace(train, final_states=None), ridges=(1e-12, 1.0))
    exact = new_translators(model, (1,))
    fit_translators_lstsq(model, exact, train, replace(train, final_states=None), ridges=(1e-12,))
    with torch.no_grad():
        torch.testing.assert_close(exact["1"](first), first @ matrix + shift, atol=1e-3, rtol=1e-3)


def test_least_squares_needs_the_last_layers_states(text):
    import pytest

    from cascade_bench.training.exit_translators import fit_translators_lstsq

    model, states = _setup(text)
    with pytest.raises(ValueError, match="keep_final=True"):
        fit_translators_lstsq(model, new_translators(model, states.layers), states, states)


def test_least_squares_keeps_the_ridge_with_the_lowest_validation_ppl(text):
    """Validation targets drawn from the exact affine map's own next-token distribution: the near-zero
    ridge recovers that map, the large one shrinks it away, so the fit must keep the small one, with
    the validation PPL and the weights of that ridge's own fit (each ridge fitted alone to compare)."""
    from dataclasses import replace

    from cascade_bench.measure.layer_exits import exit_curve
    from cascade_bench.training.exit_translators import fit_translators_lstsq

    model, states = _setup(text)
    with torch.no_grad():  # a peaked head (the random one is near uniform): ridges then differ in PPL
        model.get_output_embeddings().weight.mul_(100.0)
    d = model.config.hidden_size
    generator = torch.Generator().manual_seed(1)
    matrix = 3.0 * torch.eye(d) + 0.5 * torch.randn(d, d, generator=generator)
    shift = torch.randn(d, generator=generator)
    first = states.states[:, 0]
    train = replace(states, layers=(1,), states=states.states[:, :1], final_states=first @ matrix + shift)
    with torch.no_grad():
        teacher = shared_head(model)(1, first @ matrix + shift).float()
    repeats = 20  # many draws per state: the teacher's own distribution is then the best on them
    sampled = torch.multinomial(teacher.softmax(-1), repeats, replacement=True, generator=generator).T.reshape(-1)
    validation = replace(
        train,
        states=train.states.repeat(repeats, 1, 1),
        targets=sampled,
        final_argmax=train.final_argmax.repeat(repeats),
        final_nll=train.final_nll.repeat(repeats),
        final_states=None,
    )
    alone = {}
    for ridge in (1e-12, 1.0):
        translators = new_translators(model, (1,))
        record = fit_translators_lstsq(model, translators, train, validation, ridges=(ridge,))
        head = translated_head(model, {1: translators["1"]})
        alone[ridge] = (exit_curve(validation, head)[0].ppl, record, translators["1"].state_dict())
    assert alone[1e-12][0] < 0.95 * alone[1.0][0]  # the large ridge is clearly worse here
    for order in ((1.0, 1e-12), (1e-12, 1.0)):  # the better one wins wherever it is tried
        both = new_translators(model, (1,))
        chosen = fit_translators_lstsq(model, both, train, validation, ridges=order)["layers"][1]
        assert chosen["ridge"] == 1e-12
        assert chosen["validation_ppl"] == alone[1e-12][1]["layers"][1]["validation_ppl"] == alone[1e-12][0]
        for name, value in both["1"].state_dict().items():
            assert torch.equal(value, alone[1e-12][2][name])
