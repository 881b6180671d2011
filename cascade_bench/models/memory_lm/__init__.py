"""The memory-layer causal LM family (see ``modeling`` and ``layers``); importing it registers the
family with the Hugging Face Auto classes."""

from .configuration import LAYER_KINDS, MEMORY_LAYER_KINDS, MemoryLMConfig
from .memory_presets import MEMORY_PRESETS, create_model
from .modeling import MemoryLMForCausalLM, MemoryLMModel, register_memory_lm

register_memory_lm()

__all__ = [
    "LAYER_KINDS",
    "MEMORY_LAYER_KINDS",
    "MEMORY_PRESETS",
    "MemoryLMConfig",
    "MemoryLMForCausalLM",
    "MemoryLMModel",
    "create_model",
    "register_memory_lm",
]
