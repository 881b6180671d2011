"""How a draft model is made (``distillation``), as a torch-free dataclass: ``train-draft``'s
flags take their defaults from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DraftConfig:
    """How a draft is made (see the module docstring). ``teacher_tokens``: training tokens the teacher
    labels; ``validation_tokens``: held-out tokens for early stopping; ``window``: tokens per window."""

    layers: int = 3
    top_k: int = 16
    window: int = 256
    teacher_tokens: int = 131_072
    validation_tokens: int = 8_192
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps_per_check: int = 32
    patience: int = 3
    seconds: float = 1500.0
    hard_weight: float = 0.0
    vocabulary: int = 8192
    seed: int = 0

    def __post_init__(self):
        for name in ("layers", "top_k", "window", "teacher_tokens", "validation_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"draft {name} must be a positive int, got {value!r}")
        for name in ("steps_per_check", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"draft {name} must be a positive int, got {value!r}")
        if isinstance(self.vocabulary, bool) or not isinstance(self.vocabulary, int) or self.vocabulary < 0:
            raise ValueError(
                f"draft vocabulary must be an int >= 0 (0 = the whole vocabulary), got {self.vocabulary!r}"
            )
        for name in ("lr", "seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"draft {name} must be a positive number, got {value!r}")
        if isinstance(self.hard_weight, bool) or not isinstance(self.hard_weight, (int, float)) or self.hard_weight < 0:
            raise ValueError(f"draft hard_weight must be a number >= 0, got {self.hard_weight!r}")
