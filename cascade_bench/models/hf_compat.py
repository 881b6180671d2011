"""The one place that knows how the installed transformers release names what we pass it.

transformers 5.24 renamed the key/value cache of model forwards, decoder layers, mask functions,
``generate``'s model inputs and model outputs from ``past_key_values`` to ``cache``; the old name
still works there but warns (``FutureWarning``, removal announced for 5.40). Earlier releases know
only ``past_key_values``. Every call of ours that hands a cache to transformers, or reads one back,
goes through this module, so the toolkit runs warning-free on both sides of the rename.

GPT-NeoX decoder layers keep their own name (``layer_past``); a layer's name is read from its
forward signature, never assumed.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

#: Names a decoder layer's forward may take its cache under, newest first.
LAYER_CACHE_NAMES = ("cache", "past_key_values", "layer_past", "past_key_value")


@functools.lru_cache(maxsize=None)
def cache_keyword() -> str:
    """``"cache"`` where the installed transformers names the cache so (5.24 and later), else
    ``"past_key_values"``: read off ``create_causal_mask``'s signature, the function every model's
    forward calls with its cache."""
    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def with_cache(cache) -> dict:
    """``{name: cache}`` under the installed release's name, to splat into a model or mask call."""
    return {cache_keyword(): cache}


def output_cache(output) -> Optional[object]:
    """The cache a Hugging Face model output carries (None when it carries none), read under the
    installed release's field name (the old attribute warns on 5.24)."""
    return output.get(cache_keyword())


def layer_cache_keyword(layer) -> str:
    """The keyword ``layer``'s forward takes its cache under (one of ``LAYER_CACHE_NAMES``);
    ValueError naming the layer class and its parameters when it takes none of them."""
    parameters = inspect.signature(layer.forward).parameters
    for name in LAYER_CACHE_NAMES:
        if name in parameters:
            return name
    raise ValueError(
        f"decoder layer {type(layer).__name__} takes no cache argument (looked for "
        f"{LAYER_CACHE_NAMES}; its forward takes {tuple(parameters)})"
    )


def causal_mask(config, inputs_embeds, attention_mask, cache, position_ids):
    """The attention mask a Hugging Face model of ``config`` builds for itself (None where its
    attention needs none): ``transformers.masking_utils.create_causal_mask`` called with the
    installed release's keywords."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **with_cache(cache),
    )


def attention_type_mask(kind: str, function: str, config, inputs_embeds, attention_mask, cache, position_ids):
    """The mask a layer of attention type ``kind`` reads (``config.layer_types``' names): the
    ``transformers.masking_utils`` function named ``function`` (``create_causal_mask``,
    ``create_sliding_window_causal_mask``, ...), called as the model's own forward calls it."""
    import transformers.masking_utils as masking_utils

    make = getattr(masking_utils, function, None)
    if make is None:
        raise ValueError(f"this transformers release has no masking_utils.{function} for {kind!r} layers")
    return make(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **with_cache(cache),
    )
