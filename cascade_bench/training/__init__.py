"""Training, outside the model classes.

- ``loops``: training one stage, joint training, hard tokens, early stopping
- ``exit_classifier``: training a learned exit classifier with the cascade frozen
- ``protocols``: the staged protocols (ASHEM, LEGO, CASCADE, deep supervision) and baselines
- ``persistence``: saving and loading a trained Ensemble
"""

from .exit_classifier import train_exit_classifier
from .loops import TrainConfig, TrainHistory, train_llm
from .persistence import load_ensemble, save_ensemble
from .protocols import PROTOCOLS, Protocol, start_ensemble, train_ensemble, train_protocol

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "TrainConfig",
    "TrainHistory",
    "load_ensemble",
    "save_ensemble",
    "start_ensemble",
    "train_ensemble",
    "train_exit_classifier",
    "train_llm",
    "train_protocol",
]
