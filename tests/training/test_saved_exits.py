"""Trained exits on disk: what a recipe saves comes back as modules that compute exactly what the
saved ones computed (every saved recipe, on a tiny Llama); a file for another model's shape, a layer
it lacks, a file `train-exits` did not write and the LoRA recipe are refused by name; loading leaves
the model's own parameters as trainable as they were; a trained per-token exit behind the shared
head drafts self-speculative decoding that is still exactly greedy."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.stages.blocks import Translator, exit_through, head_sharing
from cascade_bench.stages.ensemble import Ensemble
from cascade_bench.training.exit_recipes import build_recipe
from cascade_bench.training.persistence import save_ensemble
from cascade_bench.training.saved_exits import SAVED_RECIPES, exits_path, load_exits, save_exits
from tests.helpers import tiny_ensemble

LAYERS = (1, 3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_ensemble("llama-tiny", layers=(4,))[0].model.eval()


def _trained(name: str, model):
    """A recipe whose exits are not the identity (random weights stand in for training)."""
    size = model.config.hidden_size
    recipe = build_recipe(name, model, LAYERS, {layer: Translator(size) for layer in LAYERS})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in recipe.exits.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return recipe


def _outputs(name: str, exits: dict, states: torch.Tensor) -> dict:
    mask = torch.ones(states.shape[:2], dtype=torch.long)
    with torch.no_grad():
        return {layer: module(states, mask) if name == "adapter" else module(states) for layer, module in exits.items()}


@pytest.mark.parametrize("name", SAVED_RECIPES)
def test_saved_exits_come_back_computing_what_they_computed(model, tmp_path, name):
    recipe = _trained(name, model)
    path = save_exits(recipe, exits_path(tmp_path, name), "tiny")
    assert path.name == name.replace("+", "_") + ".pt"
    states = torch.randn(2, 5, model.config.hidden_size)
    before = _outputs(name, {layer: recipe.exits[str(layer)] for layer in LAYERS}, states)
    loaded_name, exits = load_exits(path, model)
    assert loaded_name == name and sorted(exits) == list(LAYERS)
    after = _outputs(name, exits, states)
    for layer in LAYERS:
        assert not torch.allclose(before[layer], states)  # not the identity: the weights travelled
        torch.testing.assert_close(after[layer], before[layer], rtol=0, atol=0)
        assert not any(p.requires_grad for p in exits[layer].parameters())
    _, only = load_exits(path, model, [3])
    assert sorted(only) == [3]


def test_loading_leaves_the_model_as_trainable_as_it_was(tmp_path):
    torch.manual_seed(0)
    model = tiny_ensemble("llama-tiny", layers=(4,))[0].model
    path = save_exits(_trained("lstsq", model), tmp_path / "a.pt", "tiny")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    load_exits(path, model)
    assert all(p.requires_grad for p in model.parameters())


def test_files_for_another_model_or_layer_and_foreign_files_are_refused(model, tmp_path):
    path = save_exits(_trained("mlp", model), tmp_path / "mlp.pt", "tiny")
    torch.manual_seed(0)
    deeper = tiny_ensemble("llama-tiny", layers=(5,))[0].model
    with pytest.raises(ValueError, match="trained on tiny .*4 layers.*5 layers"):
        load_exits(path, deeper)
    with pytest.raises(ValueError, match=r"has exits at layers \[1, 3\], not at \[2\]"):
        load_exits(path, model, [2])
    with pytest.raises(ValueError, match="no such file"):
        load_exits(tmp_path / "missing.pt", model)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a file `train-exits` wrote"):
        load_exits(foreign, model)
    lora = tmp_path / "lora.pt"
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "recipe": "lora"}, lora)
    with pytest.raises(ValueError, match="names recipe 'lora'; expected one of"):
        load_exits(lora, model)
    narrow = tmp_path / "narrow.pt"
    layers = {
        k: {n: t[..., :1] if n.endswith("up.weight") else t for n, t in v.items()} for k, v in payload["layers"].items()
    }
    torch.save({**payload, "layers": layers}, narrow)
    with pytest.raises(ValueError, match="layer 1: its weights do not fit this release's 'mlp' exit"):
        load_exits(narrow, model)
    with pytest.raises(
        ValueError, match=r"is a folder; pass one of its files \(foreign.pt, lora.pt, mlp.pt, narrow.pt\)"
    ):
        load_exits(tmp_path, model)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"not a file `train-exits` wrote \(not a checkpoint of plain tensors"):
        load_exits(text, model)


def test_the_lora_recipe_is_not_saved_as_exits(tmp_path):
    torch.manual_seed(0)
    model = tiny_ensemble("llama-tiny", layers=(4,))[0].model
    recipe = build_recipe("lora", model, LAYERS, {layer: Translator(model.config.hidden_size) for layer in LAYERS})
    try:
        with pytest.raises(ValueError, match="recipe 'lora' is not saved as exits"):
            save_exits(recipe, tmp_path / "lora.pt", "tiny")
    finally:
        recipe.close()


def test_a_trained_exit_drafts_self_speculation_that_is_still_exactly_greedy(model, tmp_path):
    from cascade_bench.routing.generation import generate
    from cascade_bench.routing.speculative import self_speculative_generate

    path = save_exits(_trained("mlp", model), tmp_path / "mlp.pt", "tiny")
    _, exits = load_exits(path, model, [3])
    blocks = Ensemble.from_blocks(model, [3])
    shared = blocks[0].head
    exit_through(blocks[0], exits[3])
    assert blocks[0].head.norm is shared.norm and blocks[0].head.lm_head is shared.lm_head
    assert blocks[0].head_macs_per_token == shared.macs_per_token + exits[3].macs_per_token
    hidden = torch.randn(4, model.config.hidden_size)
    with torch.no_grad():  # the draft reads the trained exit, then the model's own norm and head
        torch.testing.assert_close(blocks[0].logits(hidden), shared.lm_head(shared.norm(exits[3](hidden))))
    assert head_sharing(list(blocks)) == "own"  # not a Translator: a cascade of these is not saved as one
    with pytest.raises(ValueError, match=r"blocks \[0\] exit through a trained exit that is not a Translator"):
        save_ensemble(blocks, tmp_path / "cascade")
    size = model.config.hidden_size
    assert exits[3].macs_per_token == size * size + 2 * size * 2 * size  # translator, then the MLP (width 2d)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    drafted = self_speculative_generate(blocks, ids, max_new_tokens=9, draft_length=3)
    plain = generate(Ensemble.from_blocks(model, []), ids, max_new_tokens=9)
    torch.testing.assert_close(drafted.tokens, plain.tokens, rtol=0, atol=0)
    assert drafted.drafted > 0
