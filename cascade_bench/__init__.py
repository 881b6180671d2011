"""cascade_bench: measure what early exit really buys for causal language models.

The package follows the pipeline, each subpackage importing only from those above it in this list:
``data`` and ``stages`` (bottom), ``measure``, ``routing``, ``training``, ``cost``, ``experiment``,
``bench``, and ``cli`` on top (docs/layout.md; ``tests/test_layering.py`` keeps it so). The names
below are the public API; everything else is importable from its module.
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]):
    """``(__all__, __getattr__, __dir__)`` for ``package``, whose public names live in its submodules
    (``exports``: a relative module -> the names it provides) and load on first use (PEP 562).
    Importing a package then imports nothing heavy: ``cascade-bench --help`` answers without torch,
    and ``from cascade_bench import Ensemble`` loads what ``Ensemble`` needs, once."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return sorted(where), __getattr__, __dir__


# The public API; the memory-layer family registers with the Auto classes wherever a model is built or
# loaded (``stages.families.register_own_families``).
_public, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".cost": ("CostRecord", "format_cost", "measure_cost"),
        ".data": ("byte_token_windows", "embedded_documents", "load_corpus", "prepare_data"),
        ".measure": ("count_flops",),
        ".routing": (
            "RoutedOutput",
            "calibrate_thresholds",
            "evaluate",
            "forward_cascade",
            "generate",
            "risk_controlled_thresholds",
        ),
        ".stages": (
            "BUILTIN_EXIT_RULES",
            "LLM",
            "Block",
            "Ensemble",
            "ExitClassifier",
            "ExitRule",
            "build_blocks",
            "build_ensemble",
            "low_rank_max_prob",
            "resolve_exit_rule",
            "stage_config",
            "top_k_max_prob",
        ),
        ".training": (
            "PROTOCOLS",
            "load_ensemble",
            "save_ensemble",
            "start_ensemble",
            "train_exit_classifier",
            "train_protocol",
        ),
    },
)
__all__ = ["__version__", *_public]
