"""How the installed transformers names the key/value cache, read off its signatures."""

import pytest
import torch
import transformers
from packaging.version import Version

from cascade_bench.models.hf_compat import cache_keyword, layer_cache_keyword, output_cache, with_cache
from tests.helpers import tiny_ensemble


def test_the_cache_keyword_follows_the_5_24_rename():
    renamed = Version(transformers.__version__) >= Version("5.24")
    assert cache_keyword() == ("cache" if renamed else "past_key_values")
    assert with_cache(None) == {cache_keyword(): None}


@pytest.mark.parametrize("preset, expected", [("gpt_neox-tiny", "layer_past"), ("llama-tiny", None)])
def test_a_layers_cache_keyword_comes_from_its_signature(preset, expected):
    layer = tiny_ensemble(preset)[0].layers[0]
    assert layer_cache_keyword(layer) == (expected or cache_keyword())


def test_a_layer_without_a_cache_argument_is_named():
    with pytest.raises(ValueError, match="Linear takes no cache argument"):
        layer_cache_keyword(torch.nn.Linear(2, 2))


def test_the_cache_comes_back_from_a_model_output_without_warning(recwarn):
    model = tiny_ensemble("llama-tiny")[0].model
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
    assert output_cache(out).get_seq_length() == 3
    assert not [w for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))]
