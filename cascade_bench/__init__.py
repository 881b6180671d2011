"""cascade_bench: measure what early exit really buys for causal language models.

The package follows the pipeline, each subpackage importing only from those above it in this list:
``data`` and ``stages`` (bottom), ``measure``, ``routing``, ``training``, ``cost``, ``experiment``,
``bench``, and ``cli`` on top (docs/layout.md; ``tests/test_layering.py`` keeps it so). The names
below are the public API; everything else is importable from its module.
"""

from .cost import CostRecord, format_cost, measure_cost
from .data import byte_token_windows, embedded_documents, load_corpus, prepare_data
from .measure import count_flops
from .models import memory_lm as _memory_lm  # noqa: F401  (registers the memory-layer family with the Auto classes)
from .routing import (
    RoutedOutput,
    calibrate_thresholds,
    evaluate,
    forward_cascade,
    full_forward,
    generate,
    masked_forward,
    risk_controlled_thresholds,
    routed_forward,
)
from .stages import (
    BUILTIN_EXIT_FUNCTIONS,
    LLM,
    Block,
    Ensemble,
    ExitClassifier,
    ExitFunction,
    build_blocks,
    build_ensemble,
    low_rank_max_prob,
    resolve_exit_function,
    stage_config,
    top_k_max_prob,
)
from .training import PROTOCOLS, load_ensemble, save_ensemble, start_ensemble, train_exit_classifier, train_protocol

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_EXIT_FUNCTIONS",
    "LLM",
    "PROTOCOLS",
    "Block",
    "CostRecord",
    "Ensemble",
    "ExitFunction",
    "RoutedOutput",
    "__version__",
    "build_blocks",
    "build_ensemble",
    "byte_token_windows",
    "calibrate_thresholds",
    "count_flops",
    "embedded_documents",
    "evaluate",
    "format_cost",
    "forward_cascade",
    "full_forward",
    "generate",
    "load_corpus",
    "load_ensemble",
    "masked_forward",
    "measure_cost",
    "prepare_data",
    "resolve_exit_function",
    "routed_forward",
    "save_ensemble",
    "stage_config",
    "start_ensemble",
    "train_protocol",
    "ExitClassifier",
    "low_rank_max_prob",
    "top_k_max_prob",
    "risk_controlled_thresholds",
    "train_exit_classifier",
]
