"""Propagated keys/values are exactly what each layer caches for the same layer input."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.stages.key_values import layer_key_values
from tests.helpers import FAMILIES, KINDS, tiny_ensemble, token_batch


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_layer_key_values_equal_the_models_own_cache(kind, preset, text):
    from transformers import DynamicCache

    ensemble = tiny_ensemble(preset, kind=kind)
    stage = ensemble[1]
    ids = token_batch(text, 2, 10)
    positions = torch.arange(3, 13).expand(2, -1)  # not starting at 0: rotary offsets must match
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda _m, a, kw: inputs.append(a[0] if a else kw["hidden_states"]),
                                             with_kwargs=True) for layer in stage.layers]
    with torch.inference_mode():
        state = ensemble[0](input_ids=ids).hidden
        cache = DynamicCache()
        stage(inputs_embeds=state, position_ids=positions, past_key_values=cache, use_cache=True)
        for hook in hooks:
            hook.remove()
        for i, layer in enumerate(stage.layers):
            keys, values = layer_key_values(stage, layer, inputs[i], positions)
            torch.testing.assert_close(keys, cache.layers[i].keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(values, cache.layers[i].values, atol=1e-5, rtol=0)
