"""Per-layer exits of an unsplit model: states equal the blocks' residual streams, the shared head
at layer L is the model itself, and the oracle layer counts follow their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from cascade_bench import Ensemble
from cascade_bench.measure.layer_exits import LayerExit, collect_layer_states, exit_curve, layers_needed, shared_head
from cascade_bench.routing.passes import forward_cascade
from cascade_bench.stages.presets import stage_config
from tests.helpers import INF, ROUTED_FAMILIES, token_batch


def _model(preset):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(stage_config(preset, num_hidden_layers=4)).eval()


def _batches(text):
    ids = token_batch(text, 2, 12, offset=30)
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    targets[0, :3] = -100  # unscored context, as in sliding windows
    return [{"input_ids": ids, "targets": targets}]


@pytest.mark.parametrize("preset", ROUTED_FAMILIES)
def test_states_and_the_shared_head_are_the_blocks_exits(preset, text):
    model = _model(preset)
    batches = _batches(text)
    states = collect_layer_states(model, batches, [1, 3])
    scored = batches[0]["targets"] != -100
    assert states.tokens == int(scored.sum()) and states.states.shape == (states.tokens, 2, model.config.hidden_size)
    with torch.inference_mode():
        full = model(batches[0]["input_ids"]).logits[scored]
        exits = forward_cascade(
            Ensemble.from_blocks(model, [1]), batches[0]["input_ids"], thresholds=[-INF], return_logits=True
        ).logits[scored]  # everybody exits after layer 1
    assert torch.equal(states.final_argmax, full.argmax(-1))
    curve = exit_curve(states, shared_head(model))
    torch.testing.assert_close(curve[0].argmax, exits.argmax(-1), rtol=0, atol=0)
    nll = torch.nn.functional.cross_entropy(exits, states.targets)
    assert math.isclose(curve[0].ppl, math.exp(float(nll)), rel_tol=1e-5)
    assert math.isclose(
        states.final_ppl, math.exp(float(torch.nn.functional.cross_entropy(full, states.targets))), rel_tol=1e-5
    )


def test_max_tokens_keeps_the_first_scored_positions(text):
    model = _model("gpt2-tiny")
    everything = collect_layer_states(model, _batches(text), [2])
    first = collect_layer_states(model, _batches(text), [2], max_tokens=5)
    assert first.tokens == 5 and torch.equal(first.targets, everything.targets[:5])


def test_layers_needed_by_hand():
    final = torch.tensor([7, 7, 7, 7])
    # candidate layers 2, 4, 6 of 8; per token the candidates' predictions:
    # token 0: right at 2 and after (first 2, settled 2); token 1: right at 2, wrong at 4, right at 6
    # (first 2, settled 6); token 2: never right (first 8, settled 8); token 3: right only at 6 (6, 6)
    rows = torch.tensor([[7, 7, 7], [7, 1, 7], [1, 1, 1], [1, 2, 7]])
    curve = [
        LayerExit(layer=layer, ppl=1.0, accuracy=0.0, agreement=0.0, argmax=rows[:, i])
        for i, layer in enumerate((2, 4, 6))
    ]
    needed = layers_needed(curve, final, num_layers=8)
    assert needed.first_agreement == (2 + 2 + 8 + 6) / 4
    assert needed.settled == (2 + 6 + 8 + 6) / 4
    assert needed.grid == (2, 4, 6)


def test_candidate_layers_are_checked(text):
    with pytest.raises(ValueError, match=r"must be in \[1, 4\)"):
        collect_layer_states(_model("gpt2-tiny"), _batches(text), [4])
