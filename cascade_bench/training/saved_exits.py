"""Trained exits on disk: what ``train-exits`` keeps of a frozen-trunk recipe, and how a decoder
gets it back.

One file per recipe, ``<name>.exits/<recipe>.pt``: a dict of plain values and tensors (read with
``torch.load(weights_only=True)``): the format tag and version, the recipe, the model it was trained
on (its config name and hidden size, its layer count), and per candidate layer the state dict of
the recipe's exit module. Loading rebuilds the exits through the recipe itself (``build_recipe``
with identity translators, then the saved weights), so a saved exit is the module that was
evaluated, not a second implementation of it. The LoRA recipe changes the trunk and is not an exit
of the original model: it is not saved this way.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data.storage import write_bytes_atomic
from .exit_recipes import ExitRecipe, build_recipe
from .exit_translators import new_translators

FORMAT = "cascade_bench.exits"
VERSION = 1
#: The recipes whose exits read one position at a time (a translated stream): a decoder can use them
#: as an exit head as they are. The attention adapter reads earlier positions through attention.
PER_TOKEN_RECIPES = ("lstsq", "lstsq+kl", "mlp")
SAVED_RECIPES = (*PER_TOKEN_RECIPES, "adapter")


def exits_path(folder: Path, recipe: str) -> Path:
    """Where ``train-exits`` writes ``recipe``'s exits in ``folder`` (``+`` spelled ``_``)."""
    return Path(folder) / f"{recipe.replace('+', '_')}.pt"


def save_exits(recipe: ExitRecipe, path: Path, model_name: str) -> Path:
    """Write ``recipe``'s exits (every candidate layer) to ``path`` atomically; returns ``path``."""
    if recipe.name not in SAVED_RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is not saved as exits (only {list(SAVED_RECIPES)})")
    config = recipe.model.config
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "recipe": recipe.name,
        "model": model_name,
        "model_type": str(config.model_type),
        "hidden_size": int(config.hidden_size),
        "num_layers": int(config.num_hidden_layers),
        "layers": {
            str(layer): {k: v.detach().cpu().clone() for k, v in recipe.exits[str(layer)].state_dict().items()}
            for layer in recipe.layers
        },
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(Path(path), buffer.getvalue())
    return Path(path)


def read_exits_file(path: Path) -> dict:
    """The saved payload, checked for its format; ValueError naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        held = sorted(p.name for p in path.glob("*.pt"))
        raise ValueError(
            f"exits file {path} is a folder; pass one of its files ({', '.join(held) or 'it holds no .pt'})"
        )
    if not path.is_file():
        raise ValueError(f"exits file {path}: no such file; expected <name>.exits/<recipe>.pt from `train-exits`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's own message advises weights_only=False: not for a file of ours
        raise ValueError(
            f"exits file {path} is not a file `train-exits` wrote (not a checkpoint of plain tensors: "
            f"{type(error).__name__})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"exits file {path} is not a file `train-exits` wrote (no {FORMAT!r} format tag)")
    if payload.get("version") != VERSION:
        raise ValueError(f"exits file {path} has version {payload.get('version')!r}; this release reads {VERSION}")
    if payload.get("recipe") not in SAVED_RECIPES:
        raise ValueError(
            f"exits file {path} names recipe {payload.get('recipe')!r}; expected one of {list(SAVED_RECIPES)}"
        )
    return payload


def saved_layers(payload: dict) -> list[int]:
    """The layers a saved payload holds exits at, in order."""
    return sorted(int(layer) for layer in payload["layers"])


def load_exits(path: Path, model: nn.Module, layers: Sequence[int] = ()) -> tuple[str, dict[int, nn.Module]]:
    """The recipe's name and its exit modules per layer (``layers``: those only; default all saved),
    on ``model``'s device and dtype, in eval mode. ValueError when the file was trained on a model of
    another shape or lacks a layer asked for."""
    return exits_from_payload(read_exits_file(path), model, layers, path)


def exits_from_payload(
    payload: dict, model: nn.Module, layers: Sequence[int] = (), path: "Path | str" = "(payload)"
) -> tuple[str, dict[int, nn.Module]]:
    """``load_exits`` of a payload already read by ``read_exits_file`` (``path`` names it in errors)."""
    config = model.config
    shape = (str(config.model_type), int(config.hidden_size), int(config.num_hidden_layers))
    saved_shape = (payload["model_type"], payload["hidden_size"], payload["num_layers"])
    if shape != saved_shape:
        raise ValueError(
            f"exits file {path} was trained on {payload['model']} ({saved_shape[0]}, width {saved_shape[1]}, "
            f"{saved_shape[2]} layers); this model is {shape[0]}, width {shape[1]}, {shape[2]} layers"
        )
    saved = saved_layers(payload)
    wanted = list(layers) or saved
    missing = [layer for layer in wanted if layer not in saved]
    if missing:
        raise ValueError(f"exits file {path} has exits at layers {saved}, not at {missing}")
    translators = new_translators(model, wanted)
    was_trainable = {id(p): p.requires_grad for p in model.parameters()}
    recipe = build_recipe(payload["recipe"], model, wanted, {layer: translators[str(layer)] for layer in wanted})
    for parameter in model.parameters():  # building a recipe freezes the model; give it back as it was
        parameter.requires_grad_(was_trainable[id(parameter)])
    exits = {}
    for layer in wanted:
        module = recipe.exits[str(layer)]
        try:
            module.load_state_dict(payload["layers"][str(layer)])
        except RuntimeError as error:  # another shape: a file of another release's exit sizes
            raise ValueError(
                f"exits file {path}, layer {layer}: its weights do not fit this release's "
                f"{payload['recipe']!r} exit ({str(error).splitlines()[0]})"
            ) from error
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        exits[layer] = module.eval()
    return payload["recipe"], exits


__all__ = [
    "PER_TOKEN_RECIPES",
    "SAVED_RECIPES",
    "exits_from_payload",
    "exits_path",
    "load_exits",
    "read_exits_file",
    "save_exits",
    "saved_layers",
]
