"""Stages: the models a cascade is made of (inference only; imports nothing of ours).

- ``families``: the one adapter that knows where each Hugging Face family keeps its parts
- ``exits``: exit functions, per-token confidence
- ``exit_rules``: exit rules with weights: the learned exit classifier, cheap max-prob heads
- ``stage``: the ``Stage`` protocol every stage implements, and the members they share (``StageBase``)
- ``llm``: ``LLM``, one whole causal LM as a stage
- ``blocks``: ``Block``, a slice of layers of one model with its exit head
- ``ensemble``: ``Ensemble``, the ordered, validated list of stages
- ``presets``: stage presets and ``from_config`` builders
- ``stage_cache``: the KV cache of one stage during generation
"""

from .blocks import Block, cut_into_blocks
from .ensemble import Ensemble, evaluation_mode
from .exit_rules import ExitClassifier, low_rank_max_prob, top_k_max_prob
from .exits import BUILTIN_EXIT_FUNCTIONS, ExitFunction, resolve_exit_function
from .llm import LLM
from .presets import STAGE_PRESETS, build_blocks, build_ensemble, stage_config
from .stage import Stage

__all__ = [
    "BUILTIN_EXIT_FUNCTIONS",
    "LLM",
    "STAGE_PRESETS",
    "Stage",
    "Block",
    "Ensemble",
    "ExitFunction",
    "build_blocks",
    "build_ensemble",
    "cut_into_blocks",
    "evaluation_mode",
    "resolve_exit_function",
    "stage_config",
    "ExitClassifier",
    "low_rank_max_prob",
    "top_k_max_prob",
]
