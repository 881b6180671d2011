"""The seed's four presets: six ``pythia`` layers, or one memory layer (first) and five ``pythia``."""

from __future__ import annotations

from .configuration import LAYER_KINDS, MemoryLMConfig
from .modeling import MemoryLMForCausalLM

MEMORY_PRESETS: dict[str, tuple[str, ...]] = {
    "pythia": ("pythia",) * 6,
    "infini": ("infini",) + ("pythia",) * 5,
    "multi_memory": ("multi_memory",) + ("pythia",) * 5,
    "hierarchical": ("hierarchical",) + ("pythia",) * 5,
}


def create_model(name: str = "pythia", **options) -> MemoryLMForCausalLM:
    """A freshly initialised model of preset ``name`` (``MEMORY_PRESETS``); ``options`` set any
    ``MemoryLMConfig`` field (``layer_kinds`` replaces the preset's layer list)."""
    if name not in MEMORY_PRESETS:
        raise ValueError(
            f"unknown memory-LM preset {name!r}; expected one of {sorted(MEMORY_PRESETS)} "
            f"(or any layer list drawn from {list(LAYER_KINDS)} as layer_kinds=...)"
        )
    options.setdefault("layer_kinds", MEMORY_PRESETS[name])
    return MemoryLMForCausalLM(MemoryLMConfig(**options))
