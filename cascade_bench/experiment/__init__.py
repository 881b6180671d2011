"""Experiments: the ``run`` pipeline, its results, reports and plots.

- ``config``: ``ExperimentConfig``, one frozen, validated dataclass
- ``pipeline``: ``run_experiment``, from a config to results
- ``rule_sweep``: the run's exit rules, built on the trained cascade and switched in turn
- ``results_store``: one JSON line per evaluated point, rewritten atomically
- ``checks``: plausibility checks on stored results
- ``reports``: Markdown, LaTeX and CSV tables and ``<name>.report.md``
- ``plots``: cost-vs-PPL, exit ratios and confidence figures
- ``comparison``: several runs compared at matched FLOPs
"""

from cascade_bench import lazy_exports

# public names load from their modules on first use (PEP 562): importing the package imports no torch
__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".config": ("ExperimentConfig", "make_config"),
        ".pipeline": ("run_experiment",),
        ".results_store": ("ResultsStore",),
    },
)
