"""The keys and values a stage's decoder layers would store for given input states, per family.

K/V propagation (CALM): a token that exited before stage k still gets an entry in stage k's
cache, computed from its exit state as if that state were every layer's input: the layer's
input norm, then its key and value projections only (no query, no attention, no MLP), with
rotary positions applied to the keys where the family has them. The state a stage's layers
read is what its embedding step would make of it: an LLM stage adds its absolute position
embedding (GPT-2) to the state it gets as ``inputs_embeds``; a later block reads the residual
stream as it is.
"""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import Tensor

from .families import layer_slice_recipe

#: Families whose layers' key/value projections this module knows (and any family cut by the standard
#: layout whose attention has ``k_proj``/``v_proj``, optionally ``k_norm``/``v_norm``: Gemma 3's).
KEY_VALUE_FAMILIES = (
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "gpt_neox",
    "cascade_memory_lm",
)  # memory family: pythia layers


def _source_model(stage):
    return stage.source if hasattr(stage, "source") else stage.model


def stage_layer_input(stage, state: Tensor, position_ids: Tensor) -> Tensor:
    """(n, L, d) what ``stage``'s first decoder layer reads for states (n, L, d) handed to it as
    ``inputs_embeds`` at ``position_ids`` (n, L) (eval mode: dropout is the identity)."""
    model = _source_model(stage)
    recipe = layer_slice_recipe(model)
    is_block = hasattr(stage, "source")
    if recipe.position_embedding is not None and not (is_block and not stage.reads_tokens):
        table = getattr(model.base_model, recipe.position_embedding)
        state = state + table(position_ids).to(state.dtype)
    return state


def _rotate(stage, layer, keys: Tensor, normed: Tensor, position_ids: Tensor) -> Tensor:
    model = _source_model(stage)
    rotary_name = layer_slice_recipe(model).rotary
    if rotary_name is None:
        return keys
    rotary = getattr(model.base_model, rotary_name)
    if "layer_type" in inspect.signature(rotary.forward).parameters:  # local vs global RoPE (Gemma 3)
        kind = model.config.layer_types[layer.self_attn.layer_idx]
        cos, sin = rotary(normed, position_ids, kind)
    else:
        cos, sin = rotary(normed, position_ids=position_ids)
    apply = importlib.import_module(type(layer).__module__).apply_rotary_pos_emb
    return apply(keys, keys, cos, sin)[1]


#: The submodules a Llama-style attention may have for its keys/values to be computed here: any other
#: (Hunyuan's ``key_layernorm``, say) changes the keys in a way this module does not know.
_KNOWN_ATTENTION_PARTS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "v_norm"})


def _standard_attention(stage, layer) -> bool:
    """A layer of a family cut by the standard layout with Llama-style attention projections and
    nothing else that touches keys or values (no unknown norm, no clipping of q/k/v)."""
    model = _source_model(stage)
    attn = getattr(layer, "self_attn", None)
    return (
        layer_slice_recipe(model).derived
        and hasattr(layer, "input_layernorm")
        and all(hasattr(attn, name) for name in ("k_proj", "v_proj", "head_dim", "layer_idx"))
        and {name for name, _ in attn.named_children()} <= _KNOWN_ATTENTION_PARTS
        and getattr(model.config, "clip_qkv", None) is None
    )


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """(n, L, H * D) -> (n, H, L, D)."""
    n, length, _ = x.shape
    return x.view(n, length, -1, head_dim).transpose(1, 2)


def layer_key_values(stage, layer, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values (n, Hkv, L, D) that ``layer`` (of ``stage``) caches for layer inputs x (n, L, d)."""
    family = _source_model(stage).config.model_type
    n, length, d = x.shape
    if family == "gpt2":
        normed = layer.ln_1(x)
        attn = layer.attn
        weight, bias = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: (d, 3d), columns q | k | v
        kv = torch.addmm(bias[d:], normed.reshape(-1, d), weight[:, d:]).view(n, length, 2 * d)
        keys, values = kv.split(d, dim=-1)
        return _heads(keys, attn.head_dim), _heads(values, attn.head_dim)
    if family == "gpt_neox":
        normed = layer.input_layernorm(x)
        attn = layer.attention
        head_dim = attn.head_size
        weight = attn.query_key_value.weight.view(-1, 3, head_dim, d)  # rows per head: q | k | v
        bias = attn.query_key_value.bias.view(-1, 3, head_dim)
        flat = normed.reshape(1, -1, d)

        def project(part: int) -> Tensor:  # (H, n*L, D) without copying the weight
            return torch.matmul(flat, weight[:, part].transpose(1, 2)) + bias[:, part, None]

        keys, values = (project(p).view(-1, n, length, head_dim).permute(1, 0, 2, 3) for p in (1, 2))
        return _rotate(stage, layer, keys, normed, position_ids), values
    if family in ("llama", "mistral", "qwen2") or _standard_attention(stage, layer):
        normed = layer.input_layernorm(x)
        attn = layer.self_attn
        head_dim = attn.head_dim
        keys, values = _heads(attn.k_proj(normed), head_dim), _heads(attn.v_proj(normed), head_dim)
        if getattr(attn, "k_norm", None) is not None:  # per-head norms before RoPE (Gemma 3, Qwen 3, OLMo 2)
            keys = attn.k_norm(keys)
        if getattr(attn, "v_norm", None) is not None:
            values = attn.v_norm(values)
        return _rotate(stage, layer, keys, normed, position_ids), values
    if family == "cascade_memory_lm" and type(layer).__name__ == "PythiaLayer":
        from ..models.memory_lm.attention import apply_rotary

        normed = layer.ln_1(x)
        attn = layer.attention
        kv = torch.nn.functional.linear(normed, attn.qkv.weight[d:], attn.qkv.bias[d:])  # rows: q | k | v
        keys, values = (_heads(part, attn.head_dim) for part in kv.split(d, dim=-1))
        cos, sin = _source_model(stage).base_model.rotary(normed, position_ids)
        return apply_rotary(keys, cos, sin), values
    if family == "cascade_memory_lm":
        raise ValueError(
            f"K/V propagation needs per-token keys/values in every layer; a {type(layer).__name__} "
            f"folds finished segments into a fixed-size memory"
        )
    raise ValueError(
        f"K/V propagation does not know the {family!r} family's key/value projections; supported: {KEY_VALUE_FAMILIES}"
    )


def propagated_key_values(stage, state: Tensor, position_ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per decoder layer of ``stage``, the keys and values (n, Hkv, L, D) of exit states (n, L, d)
    propagated into it at ``position_ids`` (n, L): every layer reads the same state."""
    x = stage_layer_input(stage, state, position_ids)
    return [layer_key_values(stage, layer, x, position_ids) for layer in stage.layers]
