"""Stage presets (plain dicts in ``preset_configs``, gpt-fast style) and builders for from_config cascades."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .ensemble import Ensemble
from .families import register_own_families
from .llm import LLM
from .preset_configs import STAGE_PRESETS  # the presets' data, torch-free (the command line lists them)


def stage_config(preset: str, **overrides):
    """A Hugging Face config from a preset name, with overrides in standard config names."""
    from transformers import AutoConfig

    register_own_families()
    if preset not in STAGE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(STAGE_PRESETS)}")
    values = {**STAGE_PRESETS[preset], **overrides}
    model_type = values.pop("model_type")
    special = values["vocab_size"] - 1  # keep bos/eos inside the vocabulary
    values.setdefault("bos_token_id", special)
    values.setdefault("eos_token_id", special)
    values.setdefault("attn_implementation", "sdpa")
    attn = values.pop("attn_implementation")
    config = AutoConfig.for_model(model_type, **values)
    config._attn_implementation = attn
    return config


def build_ensemble(
    preset: str,
    layers_per_stage: Sequence[int] = (4, 4),
    exit_rule="max_prob",
    seed: Optional[int] = 0,
    device: "str | torch.device" = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Ensemble:
    """A freshly initialised cascade: one stage per entry of ``layers_per_stage``, all from ``preset``.

    Thresholds start at +inf (nobody exits) until calibrated. ``seed`` seeds torch's RNG first.
    """
    if not layers_per_stage:
        raise ValueError("layers_per_stage must name at least one stage, got an empty sequence")
    if seed is not None:
        torch.manual_seed(seed)
    ensemble = Ensemble()
    for layers in layers_per_stage:
        config = stage_config(preset, **{**overrides, "num_hidden_layers": layers})
        stage = LLM.from_config(config, exit_rule=exit_rule, threshold=math.inf)
        ensemble.add_stage(stage.to(device=device, dtype=dtype))
    return ensemble


def build_blocks(
    preset: str,
    layers_per_block: Sequence[int] = (4, 4, 4),
    exit_rule="max_prob",
    seed: Optional[int] = 0,
    device: "str | torch.device" = "cpu",
    dtype: torch.dtype = torch.float32,
    heads: str = "shared",
    **overrides,
) -> Ensemble:
    """One freshly initialised model of ``sum(layers_per_block)`` layers from ``preset``, cut into
    blocks of the given sizes (``Ensemble.from_blocks``). Thresholds start at +inf."""
    from transformers import AutoModelForCausalLM

    sizes = list(layers_per_block)
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"layers_per_block must be positive ints, at least one, got {layers_per_block!r}")
    if seed is not None:
        torch.manual_seed(seed)
    config = stage_config(preset, **{**overrides, "num_hidden_layers": sum(sizes)})
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    boundaries = [sum(sizes[:k]) for k in range(1, len(sizes))]
    return Ensemble.from_blocks(model, boundaries, exit_rule=exit_rule, heads=heads)
