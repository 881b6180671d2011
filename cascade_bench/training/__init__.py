"""Training, outside the model classes.

- ``loops``: training one stage, joint training, hard tokens, early stopping
- ``exit_classifier``: training a learned exit classifier with the cascade frozen
- ``protocols``: the staged protocols (ASHEM, LEGO, CASCADE, deep supervision) and baselines
- ``persistence``: saving and loading a trained Ensemble
"""

from cascade_bench import lazy_exports

# public names load from their modules on first use (PEP 562): importing the package imports no torch
__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".exit_classifier": ("train_exit_classifier",),
        ".loops": ("TrainConfig", "TrainHistory", "train_llm"),
        ".persistence": ("load_ensemble", "save_ensemble"),
        ".protocols": ("PROTOCOLS", "Protocol", "start_ensemble", "train_ensemble", "train_protocol"),
    },
)
