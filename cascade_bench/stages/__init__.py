"""Stages: the models a cascade is made of (inference only; imports nothing of ours).

- ``families``: the one adapter that knows where each Hugging Face family keeps its parts
- ``exits``: exit rules, per-token confidence
- ``exit_rules``: exit rules with weights: the learned exit classifier, cheap max-prob heads
- ``stage``: the ``Stage`` protocol every stage implements, and the members they share (``StageBase``)
- ``llm``: ``LLM``, one whole causal LM as a stage
- ``blocks``: ``Block``, a slice of layers of one model with its exit head
- ``ensemble``: ``Ensemble``, the ordered, validated list of stages
- ``presets``: stage presets and ``from_config`` builders
- ``stage_cache``: the KV cache of one stage during generation
"""

from cascade_bench import lazy_exports

# public names load from their modules on first use (PEP 562): importing the package imports no torch
__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".blocks": ("Block", "cut_into_blocks"),
        ".ensemble": ("Ensemble", "evaluation_mode"),
        ".exit_rules": ("ExitClassifier", "low_rank_max_prob", "top_k_max_prob"),
        ".exits": ("BUILTIN_EXIT_RULES", "ExitRule", "resolve_exit_rule"),
        ".llm": ("LLM",),
        ".presets": ("STAGE_PRESETS", "build_blocks", "build_ensemble", "stage_config"),
        ".stage": ("Stage",),
    },
)
