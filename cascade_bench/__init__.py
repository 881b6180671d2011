"""cascade_bench: measure what early exit really buys for causal language models."""

from .ensemble import Ensemble
from .exits import BUILTIN_EXIT_FUNCTIONS, ExitFunction, resolve_exit_function
from .llm import LLM
from .routing import RoutedOutput, forward_cascade, full_forward, masked_forward, routed_forward

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_EXIT_FUNCTIONS", "Ensemble", "ExitFunction", "LLM", "RoutedOutput", "forward_cascade",
    "full_forward", "masked_forward", "resolve_exit_function", "routed_forward", "__version__",
]
