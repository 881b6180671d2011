"""The exit recipes' names and their shared budget, without torch (the command line reads them;
``exit_recipes`` trains by them)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

#: Every recipe, in the order the table lists them; what each trains (``exit_recipes`` has the detail).
RECIPE_HELP = {
    "lstsq": "ridge least-squares translator per layer onto the last layer's stream (closed form, seconds)",
    "lstsq+kl": "the least-squares translator, then trained by KL to the full model's top-k distribution",
    "mlp": "a residual MLP exit on top of the least-squares translator (EE-Tuning), trained by the same KL",
    "adapter": "one attention sub-layer (a copy of the next layer's, output zeroed) before the translator "
    "(Kangaroo), trained by the same KL",
    "lora": "LoRA on the trunk with the KL at a rotating exit layer (frozen least-squares translators) plus the "
    "final layer's KL to the original model (LayerSkip-style continual training)",
}
EXIT_RECIPES = tuple(RECIPE_HELP)


@dataclass(frozen=True)
class RecipeBudget:
    """What every recipe gets: the same ``train_tokens`` of offline text (windows of ``window``
    tokens: the scored windows' length, so exits train at the contexts they are scored at),
    ``validation_tokens`` held out for early stopping, and ``seconds`` of training each, its
    validation checks included (the teacher's pass and the scoring apart; the last step may run
    over by a few seconds). One step trains one exit layer (they take
    turns) on ``batch_windows`` windows; a check (validation on the held-out windows, early stopping
    after ``patience`` checks without a new best) follows ``steps_per_check`` steps per layer."""

    train_tokens: int = 32_768
    validation_tokens: int = 4_096
    seconds: float = 360.0
    window: int = 512
    batch_windows: int = 2
    steps_per_check: int = 8
    patience: int = 3
    top_k: int = 32
    seed: int = 0
    max_checks: Optional[int] = None  # a safety cap on checks after the start (None: time and patience only)

    def __post_init__(self):
        for name in ("train_tokens", "validation_tokens", "window", "batch_windows", "steps_per_check", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"recipe budget {name} must be a positive int, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= 1024:
            raise ValueError(f"recipe budget top_k must be an int in [1, 1024], got {self.top_k!r}")
        if self.max_checks is not None and (
            isinstance(self.max_checks, bool) or not isinstance(self.max_checks, int) or self.max_checks < 1
        ):
            raise ValueError(f"recipe budget max_checks must be None or a positive int, got {self.max_checks!r}")
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) or not self.seconds > 0:
            raise ValueError(f"recipe budget seconds must be a positive number, got {self.seconds!r}")
        for name in ("train_tokens", "validation_tokens"):
            if getattr(self, name) < self.window:
                raise ValueError(
                    f"recipe budget {name} ({getattr(self, name)}) must hold one window of {self.window} tokens"
                )

    def scaled(self, factor: float) -> "RecipeBudget":
        """Training tokens and seconds times ``factor`` (``--budget``: 4 on a GPU, 0.1 for a smoke run)."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"--budget must be a positive number, got {factor!r}")
        return replace(
            self,
            train_tokens=max(self.window, int(self.train_tokens * factor)),
            seconds=self.seconds * factor,
        )


def check_recipes(names) -> tuple[str, ...]:
    """The asked recipes in table order; ValueError naming an unknown one."""
    names = tuple(names)
    unknown = [n for n in names if n not in RECIPE_HELP]
    if unknown or not names:
        raise ValueError(f"exit recipes must be some of {list(EXIT_RECIPES)}, got {list(names)}")
    return tuple(n for n in EXIT_RECIPES if n in names)


__all__ = ["EXIT_RECIPES", "RECIPE_HELP", "RecipeBudget", "check_recipes"]
