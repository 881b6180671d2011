"""Experiments: the ``run`` pipeline, its results, reports and plots.

- ``config``: ``ExperimentConfig``, one frozen, validated dataclass
- ``pipeline``: ``run_experiment``, from a config to results
- ``rule_sweep``: the run's exit rules, built on the trained cascade and switched in turn
- ``results_store``: one JSON line per evaluated point, rewritten atomically
- ``checks``: plausibility checks on stored results
- ``reports``: Markdown, LaTeX and CSV tables and ``report.md``
- ``plots``: cost-vs-PPL, exit ratios and confidence figures
- ``comparison``: several runs compared at matched FLOPs
"""

from .config import ExperimentConfig, make_config
from .pipeline import run_experiment
from .results_store import ResultsStore

__all__ = ["ExperimentConfig", "ResultsStore", "make_config", "run_experiment"]
