"""Stage presets (plain dict, gpt-fast style) and builders for from_config cascades."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .ensemble import Ensemble
from .families import register_own_families
from .llm import LLM

#: Per-stage model configs, in standard Hugging Face config names (+ ``model_type``).
STAGE_PRESETS: dict[str, dict] = {
    # The CPU benchmark preset of the core issue: two of these make a 4+4-layer cascade.
    "gpt2-cpu": dict(
        model_type="gpt2",
        hidden_size=256,
        num_attention_heads=4,
        num_hidden_layers=4,
        vocab_size=8192,
        max_position_embeddings=1024,
    ),
    # The default experiment's stages: small enough that stages and the dense baseline train to convergence
    # within the run's 10-minute CPU budget (docs/results.md, "The default run"). Exact GELU instead of GPT-2's tanh
    # approximation and no dropout on attention probabilities: together a third of a CPU training step here,
    # for no loss of quality at this size; residual and embedding dropout (0.1) stay.
    "gpt2-mini": dict(
        model_type="gpt2",
        hidden_size=128,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1024,
        max_position_embeddings=1024,
        activation_function="gelu",
        attn_pdrop=0.0,
    ),
    # GPT-2-small-like stages for GPU benchmarks (6+6 layers = GPT-2 small depth).
    "gpt2-small": dict(
        model_type="gpt2",
        hidden_size=768,
        num_attention_heads=12,
        num_hidden_layers=6,
        vocab_size=50257,
        max_position_embeddings=1024,
    ),
    # Tiny configs for tests, one per supported family.
    "gpt2-tiny": dict(
        model_type="gpt2",
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=256,
        max_position_embeddings=128,
    ),
    "llama-tiny": dict(
        model_type="llama",
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=256,
        max_position_embeddings=128,
    ),
    # Gemma 3's text decoder (a family cut by the standard layout): sliding and full attention layers in
    # turn, a window shorter than test rows, local and global RoPE, q/k norms, scaled embeddings, tied head.
    "gemma3-tiny": dict(
        model_type="gemma3_text",
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=256,
        max_position_embeddings=128,
        sliding_window=6,
        sliding_window_pattern=2,
    ),
    "gpt_neox-tiny": dict(
        model_type="gpt_neox",
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=256,
        max_position_embeddings=128,
    ),
    # The memory-layer family (cascade_bench.models.memory_lm) for tests: every layer type, segments of 8
    # tokens so that test rows span several; stages take the list in order (blocks continue it).
    "memory-tiny": dict(
        model_type="cascade_memory_lm",
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=256,
        max_position_embeddings=128,
        segment_length=8,
        num_memories=2,
        layer_kinds=("infini", "multi_memory", "hierarchical", "pythia", "infini", "pythia"),
        num_hidden_layers=2,
    ),
    # The seed's four presets (models.memory_lm.MEMORY_PRESETS: six pythia layers, or one memory layer
    # then five pythia) at the default experiment's size (gpt2-mini: hidden 128, 4 heads, BPE 1024),
    # segments of 32 tokens; a cascade of n layers in all uses the first n of the six.
    **{
        f"memory-{name}": dict(
            model_type="cascade_memory_lm",
            hidden_size=128,
            num_attention_heads=4,
            intermediate_size=512,
            vocab_size=1024,
            max_position_embeddings=16384,
            segment_length=32,
            layer_kinds=kinds,
            num_hidden_layers=2,
        )
        for name, kinds in (
            ("pythia", ("pythia",) * 6),
            ("infini", ("infini",) + ("pythia",) * 5),
            ("multi_memory", ("multi_memory",) + ("pythia",) * 5),
            ("hierarchical", ("hierarchical",) + ("pythia",) * 5),
        )
    },
}


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
    exit_fn="max_prob",
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
        stage = LLM.from_config(config, exit_fn=exit_fn, threshold=math.inf)
        ensemble.add_stage(stage.to(device=device, dtype=dtype))
    return ensemble


def build_blocks(
    preset: str,
    layers_per_block: Sequence[int] = (4, 4, 4),
    exit_fn="max_prob",
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
    return Ensemble.from_blocks(model, boundaries, exit_fn=exit_fn, heads=heads)
