"""The one place that knows where each Hugging Face family keeps its parts.

Everything else reads models through standard config names (``hidden_size``,
``num_hidden_layers``, ``vocab_size``, ``max_position_embeddings``) and through
this adapter.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Optional

from torch import nn

# model_type -> (attribute of base_model holding the decoder layers, attribute of the final norm).
# Families not listed are found by looking for the common names below.
FAMILY_PARTS: dict[str, tuple[str, str]] = {
    "gpt2": ("h", "ln_f"),
    "llama": ("layers", "norm"),
    "mistral": ("layers", "norm"),
    "qwen2": ("layers", "norm"),
    "gpt_neox": ("layers", "final_layer_norm"),
    "cascade_memory_lm": ("layers", "norm"),
}
#: The toolkit's own families: model_type -> the module whose import registers it with the Auto classes.
OWN_FAMILIES: dict[str, str] = {"cascade_memory_lm": "cascade_bench.models.memory_lm"}


def register_own_families() -> None:
    """Register the toolkit's own model families with ``AutoConfig`` / ``AutoModelForCausalLM``, so
    configs, presets and saved checkpoints of them load like any Hugging Face family (idempotent)."""
    for module in OWN_FAMILIES.values():
        importlib.import_module(module)


#: Per-layer type lists a config may carry (one entry per layer): Hugging Face's ``layer_types``
#: (sliding vs full attention) and the memory family's ``layer_kinds``.
_PER_LAYER_LISTS = ("layer_types", "layer_kinds")


def config_for_layers(config, start: int, count: int):
    """A copy of ``config`` for ``count`` layers that continue the model's layer list at layer ``start``
    (a block cut at ``start``, or new layers grown after it). Per-layer type lists are shifted by
    ``start``: Hugging Face's ``layer_types`` keeps exactly ``count`` entries; the memory family's
    ``layer_kinds`` keeps the rest of its list, so a stage grown after this one continues it.
    ValueError when the list has fewer than ``start + count`` entries."""
    config = copy.deepcopy(config)
    for name in _PER_LAYER_LISTS:
        kinds = getattr(config, name, None)
        if kinds is None:
            continue
        if len(kinds) < start + count:
            raise ValueError(
                f"{config.model_type!r} config lists {len(kinds)} {name}, too few for layers "
                f"[{start}, {start + count}); give the model a longer {name} list"
            )
        setattr(config, name, list(kinds[start : start + count] if name == "layer_types" else kinds[start:]))
    config.num_hidden_layers = count
    return config


#: Layer kinds whose cache holds every token's keys and values (what K/V policies and cache cropping need).
PER_TOKEN_CACHE_KINDS = ("attention", "pythia")


def layer_kinds(config) -> tuple[str, ...]:
    """The kind of each of the config's ``num_hidden_layers`` decoder layers: the memory family's
    ``layer_kinds``, else ``"attention"`` for every layer (the cost model's default layer)."""
    kinds = getattr(config, "layer_kinds", None)
    count = int(config.num_hidden_layers)
    return tuple(kinds[:count]) if kinds is not None else ("attention",) * count


_LAYER_NAMES = ("layers", "h", "blocks")
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


@dataclass(frozen=True)
class FamilyParts:
    """Handles into one causal LM: its base model, decoder layers and final norm (shared, not copied)."""

    base_model: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module


def family_parts(model: nn.Module) -> FamilyParts:
    """Locate base model, decoder layers and final norm of a Hugging Face causal LM.

    Raises ValueError naming the model type and what is missing if the family is not supported.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(
            f"model of type {type(model).__name__} has no base_model; expected a Hugging Face *ForCausalLM"
        )
    layer_names, norm_names = _LAYER_NAMES, _NORM_NAMES
    if model_type in FAMILY_PARTS:
        layer_names, norm_names = (FAMILY_PARTS[model_type][0],), (FAMILY_PARTS[model_type][1],)
    layers = next((getattr(base, n) for n in layer_names if isinstance(getattr(base, n, None), nn.ModuleList)), None)
    norm = next((getattr(base, n) for n in norm_names if isinstance(getattr(base, n, None), nn.Module)), None)
    if layers is None or norm is None:
        missing = [what for what, part in (("decoder layers", layers), ("final norm", norm)) if part is None]
        raise ValueError(
            f"unsupported model family {model_type!r}: could not find its {' and '.join(missing)} on "
            f"{type(base).__name__} (looked for {layer_names} / {norm_names}); add it to "
            f"cascade_bench.stages.families.FAMILY_PARTS"
        )
    return FamilyParts(base_model=base, layers=layers, final_norm=norm)


@dataclass(frozen=True)
class LayerSliceRecipe:
    """How to run a slice of one family's decoder layers outside its base model (block stages).

    position_embedding: base-model attribute of absolute position embeddings, added once to the
    token embeddings (GPT-2), or None. rotary: base-model attribute computing the rotary (cos, sin)
    for the position ids that actually run, or None. embedding_dropout: dropout applied after the
    embeddings, or None. (The keyword a decoder layer takes its KV cache under is read off the
    layer's signature: ``models.hf_compat.layer_cache_keyword``.) padding_argument: the keyword a decoder layer
    takes the (rows, new tokens) bool mask of real
    tokens under, for layers that need it beyond the attention mask (memory writes), or None.
    """

    position_embedding: "str | None" = None
    rotary: "str | None" = None
    embedding_dropout: "str | None" = None
    padding_argument: Optional[str] = None
    #: Derived from the standard layout (not an explicit entry): checked against the unsplit model's
    #: logits the first time a model of the family is cut (``blocks.check_derived_layout``).
    derived: bool = False


#: Families whose layers can be cut into blocks. Adding one: an entry here and in FAMILY_PARTS.
LAYER_SLICE_RECIPES: dict[str, LayerSliceRecipe] = {
    "gpt2": LayerSliceRecipe(position_embedding="wpe", embedding_dropout="drop"),
    "llama": LayerSliceRecipe(rotary="rotary_emb"),
    "mistral": LayerSliceRecipe(rotary="rotary_emb"),
    "qwen2": LayerSliceRecipe(rotary="rotary_emb"),
    "gpt_neox": LayerSliceRecipe(rotary="rotary_emb", embedding_dropout="emb_dropout"),
    "cascade_memory_lm": LayerSliceRecipe(rotary="rotary", padding_argument="padding_mask"),
}


#: Attention types of ``config.layer_types`` a block can run, each with the transformers mask function it needs.
LAYER_TYPE_MASKS = {
    "full_attention": "create_causal_mask",
    "sliding_attention": "create_sliding_window_causal_mask",
    "chunked_attention": "create_chunked_causal_mask",
}


def attention_types(config) -> "list[str] | None":
    """Each decoder layer's attention type: ``config.layer_types``; else, where the config sets a
    ``sliding_window`` (the Mistral-style families), every layer slides, as their forwards do; else
    None (every layer attends causally to everything)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    window = getattr(config, "sliding_window", None)
    if window is not None and not isinstance(window, bool) and getattr(config, "use_sliding_window", True):
        return ["sliding_attention"] * int(config.num_hidden_layers)
    return None


def standard_layout_recipe(model: nn.Module) -> "LayerSliceRecipe | None":
    """The recipe most decoders of transformers 5 share, or None where ``model`` departs from it: the
    base model holds ``embed_tokens`` (any embedding scale inside it), ``layers``, ``norm`` and an
    optional ``rotary_emb`` (called per layer type when its forward takes one), every entry of
    ``config.layer_types`` is an attention type of ``LAYER_TYPE_MASKS``, no absolute position table,
    and nothing past the final norm but ``lm_head`` (no logit soft-capping). What the layout cannot
    show (an embedding scaled in the forward, say) the logit check at the first cut catches."""
    config = getattr(model, "config", None)
    base = getattr(model, "base_model", None)
    if config is None or base is None or base is model:
        return None
    parts = {name: getattr(base, name, None) for name in ("embed_tokens", "layers", "norm")}
    if not isinstance(parts["layers"], nn.ModuleList) or not all(isinstance(p, nn.Module) for p in parts.values()):
        return None
    if any(
        isinstance(getattr(base, name, None), nn.Module) for name in ("wpe", "embed_positions", "position_embeddings")
    ):
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and any(kind not in LAYER_TYPE_MASKS for kind in types):
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    rotary = "rotary_emb" if isinstance(getattr(base, "rotary_emb", None), nn.Module) else None
    return LayerSliceRecipe(rotary=rotary, derived=True)


def layer_slice_recipe(model: nn.Module) -> LayerSliceRecipe:
    """The recipe for cutting ``model`` into blocks: the family's explicit entry, else the standard
    layout's (``standard_layout_recipe``); ValueError naming the family if neither applies."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    derived = None if model_type in LAYER_SLICE_RECIPES else standard_layout_recipe(model)
    if derived is None and (model_type not in LAYER_SLICE_RECIPES or model_type not in FAMILY_PARTS):
        raise ValueError(
            f"cannot cut a {model_type!r} model ({type(model).__name__}) into blocks: it does not follow the "
            f"standard decoder layout (base model with embed_tokens, layers, norm and an optional rotary_emb, "
            f"attention-only layer_types, no logit soft-capping) and "
            f"cascade_bench.stages.families.LAYER_SLICE_RECIPES has no entry for it (it needs: where the decoder "
            f"layers and final norm sit, and how positions enter (absolute embedding or rotary)); "
            f"explicit entries: {sorted(LAYER_SLICE_RECIPES)}"
        )
    recipe = derived or LAYER_SLICE_RECIPES[model_type]
    base = model.base_model
    for what, name in (
        ("position embedding", recipe.position_embedding),
        ("rotary embedding", recipe.rotary),
        ("embedding dropout", recipe.embedding_dropout),
    ):
        if name is not None and not isinstance(getattr(base, name, None), nn.Module):
            raise ValueError(
                f"{model_type!r} model {type(base).__name__} has no {what} {name!r}; this "
                f"transformers version lays the family out differently than LAYER_SLICE_RECIPES expects"
            )
    return recipe


# model_type -> number of d x intermediate matrices in the MLP (2: up/down, 3: gated gate/up/down)
MLP_MATRICES: dict[str, int] = {
    "gpt2": 2,
    "gpt_neox": 2,
    "llama": 3,
    "mistral": 3,
    "qwen2": 3,
    "gemma3_text": 3,
    "cascade_memory_lm": 2,
    # dense families cut by the standard layout; tests/stages/test_standard_layout.py checks each against
    # counted FLOPs (mixture-of-experts families are not here: one MLP per token is not their cost)
    **dict.fromkeys(("apertus", "apertus1p5_text", "arcee", "jais2", "nemotron", "starcoder2"), 2),
    **dict.fromkeys(
        (
            "bitnet",
            "cwm",
            "ernie4_5",
            "exaone",
            "exaone4",
            "gemma",
            "granite",
            "granite_swa",
            "helium",
            "hunyuan_v1_dense",
            "hyperclovax",
            "internlm3",
            "iquestcoder",
            "ministral",
            "ministral3",
            "olmo",
            "olmo2",
            "olmo3",
            "qwen3",
            "seed_oss",
            "stablelm",
        ),
        3,
    ),
}


@dataclass(frozen=True)
class LayerShape:
    """What a decoder layer's matrix products depend on, read from standard config names."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    mlp_matrices: int
    vocab_size: int
    num_layers: int


def layer_shape(config) -> LayerShape:
    """LayerShape of a Hugging Face config (GPT-2's ``n_inner=None`` means 4 x hidden)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MLP_MATRICES:
        raise ValueError(f"no analytic cost model for model family {model_type!r}; supported: {sorted(MLP_MATRICES)}")
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    if model_type == "gpt2":
        inner = config.n_inner if config.n_inner is not None else 4 * hidden
    else:
        inner = config.intermediate_size
    return LayerShape(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(inner),
        mlp_matrices=MLP_MATRICES[model_type],
        vocab_size=int(config.vocab_size),
        num_layers=int(config.num_hidden_layers),
    )
