"""Propagated keys/values are exactly what each layer caches for the same layer input."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.stages.key_values import layer_key_values
from cascade_bench.stages.presets import build_blocks, build_ensemble
from tests.helpers import FAMILIES, KINDS, token_batch

#: Every Hugging Face family, and the memory family's softmax-attention (pythia) layers.
CASES = [(preset, {}) for preset in (*FAMILIES, "gemma3-tiny")] + [("memory-tiny", {"layer_kinds": ("pythia",) * 4})]


@pytest.mark.parametrize("preset, overrides", CASES, ids=[preset for preset, _ in CASES])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_key_values_equal_the_models_own_cache(kind, preset, overrides, text):
    from transformers import DynamicCache

    build = build_ensemble if kind == "llm" else build_blocks
    ensemble = build(preset, (2, 2), **overrides).eval()
    stage = ensemble[1]
    ids = token_batch(text, 2, 10)
    positions = torch.arange(3, 13).expand(2, -1)  # not starting at 0: rotary offsets must match
    inputs = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, a, kw: inputs.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
        )
        for layer in stage.layers
    ]
    with torch.inference_mode():
        state = ensemble[0](input_ids=ids).hidden
        cache = DynamicCache()
        stage(inputs_embeds=state, position_ids=positions, cache=cache, use_cache=True)
        for hook in hooks:
            hook.remove()
        for i, layer in enumerate(stage.layers):
            keys, values = layer_key_values(stage, layer, inputs[i], positions)
            torch.testing.assert_close(keys, cache.layers[i].keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(values, cache.layers[i].values, atol=1e-5, rtol=0)


def test_memory_layers_have_no_per_token_keys_values_to_propagate(text):
    ensemble = build_blocks("memory-tiny", (2, 2)).eval()
    x = torch.zeros(1, 4, 32)
    with pytest.raises(ValueError, match="InfiniLayer folds finished segments into a fixed-size memory"):
        layer_key_values(ensemble[0], ensemble[0].layers[0], x, torch.arange(4)[None])
