"""The in-place per-stage KV cache used by generation."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.stages.stage_cache import StageCache
from tests.helpers import FAMILIES, tiny_ensemble, token_batch


def _run(stage, cache, rows, ids, positions, new_valid=None):
    new_valid = torch.ones(ids.shape, dtype=torch.bool) if new_valid is None else new_valid
    past = cache.begin(rows, ids.shape[1])
    out = stage(
        input_ids=ids,
        attention_mask=cache.attention_mask(new_valid),
        position_ids=positions,
        cache=past,
        use_cache=True,
    )
    cache.commit(new_valid)
    return out.hidden


@pytest.mark.parametrize("preset", FAMILIES)
def test_prefill_then_decode_through_the_cache_equals_one_uncached_pass(preset, text):
    stage = tiny_ensemble(preset)[0]
    ids = token_batch(text, 2, 12)
    cache = StageCache(2, stage.num_layers, "cpu")
    rows = torch.arange(2)
    with torch.inference_mode():
        whole = stage(input_ids=ids).hidden
        steps = [_run(stage, cache, rows, ids[:, :9], torch.arange(9).expand(2, -1))]
        for t in range(9, 12):
            steps.append(_run(stage, cache, rows, ids[:, t : t + 1], torch.full((2, 1), t)))
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=0)
    assert cache.length == 12 and cache.count.tolist() == [12, 12] and not cache.has_gaps


def test_decode_steps_write_into_the_buffer_and_attend_over_views_of_it(text):
    stage = tiny_ensemble("gpt2-tiny")[0]
    cache = StageCache(1, stage.num_layers, "cpu")
    rows = torch.arange(1)
    ids = token_batch(text, 1, 80)
    buffers = set()
    with torch.inference_mode():
        _run(stage, cache, rows, ids[:, :10], torch.arange(10)[None])
        for t in range(10, 80):
            _run(stage, cache, rows, ids[:, t : t + 1], torch.full((1, 1), t))
            buffers.add(cache.keys[0].data_ptr())
            layer = cache.hf_cache.layers[0]
            # What the attention read is a view of the stored buffer: no copy of the context.
            assert layer.keys.data_ptr() == cache.keys[0].data_ptr() and layer.keys.shape[2] == t + 1
    # Capacity 64, then doubled once to 128 for 80 tokens: two buffers in 70 steps, not one per step.
    assert cache.keys[0].shape[2] == 128 and len(buffers) == 2


def test_a_call_on_some_rows_gives_the_others_invalid_slots_and_a_mask(text):
    stage = tiny_ensemble("gpt2-tiny")[0]
    cache = StageCache(3, stage.num_layers, "cpu")
    ids = token_batch(text, 3, 6)
    with torch.inference_mode():
        _run(stage, cache, torch.arange(3), ids[:, :4], torch.arange(4).expand(3, -1))
        assert cache.attention_mask(torch.ones(3, 1, dtype=torch.bool)) is None  # no gaps: the model's own mask
        only = torch.tensor([0, 2])
        cache.begin(only, 1)
        mask = cache.attention_mask(torch.ones(2, 1, dtype=torch.bool))
        assert mask is None  # still no gap among the slots these rows attend over
        cache.commit(torch.ones(2, 1, dtype=torch.bool))
    assert cache.has_gaps and cache.count.tolist() == [5, 4, 5]
    assert cache.valid[:, : cache.length].tolist() == [[True] * 5, [True] * 4 + [False], [True] * 5]
    cache.begin(torch.tensor([1]), 1)
    assert cache.attention_mask(torch.ones(1, 1, dtype=torch.bool)).tolist() == [[1, 1, 1, 1, 0, 1]]


@pytest.mark.parametrize("preset", FAMILIES)
def test_the_finished_4d_mask_gives_what_the_models_own_mask_construction_gives(preset, text):
    stage = tiny_ensemble(preset)[0]
    ids = token_batch(text, 3, 9)
    outputs = []
    for finished in (False, True):
        cache = StageCache(3, stage.num_layers, "cpu")
        with torch.inference_mode():
            _run(stage, cache, torch.arange(3), ids[:, :5], torch.arange(5).expand(3, -1))
            _run(stage, cache, torch.tensor([0, 2]), ids[[0, 2], 5:6], torch.full((2, 1), 5))  # row 1: a gap
            cache.reject(torch.arange(3), torch.tensor([5, 5, 3]), 5)  # row 2 drops slots 3 and 4
            new_valid = torch.tensor([[True, True], [True, False], [True, True]])
            past = cache.begin(torch.arange(3), 2)
            mask = cache.attention_mask(new_valid, stage.dtype if finished else None)
            assert mask.shape == ((3, 1, 2, 8) if finished else (3, 8))
            positions = cache.count[:, None] + torch.arange(2)[None]
            hidden = stage(
                input_ids=ids[:, 6:8], attention_mask=mask, position_ids=positions, cache=past, use_cache=True
            ).hidden
            cache.commit(new_valid)
        outputs.append(hidden[new_valid])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=0)
