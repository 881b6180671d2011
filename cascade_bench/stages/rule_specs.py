"""Exit rules by name, without torch: the built-in exit functions' names and the spec strings of the
rules with weights (``exit_rules``), and their parser. The command line's choices and the run
config's checks read these; ``exits`` and ``exit_rules`` hold what the names stand for."""

from __future__ import annotations

from typing import Optional

#: The built-in exit functions (``exits.BUILTIN_EXIT_FUNCTIONS``, which is checked against this).
EXIT_FUNCTION_NAMES = ("cos_sim", "margin", "max_prob", "neg_entropy")
#: What a learned exit classifier predicts.
CLASSIFIER_TARGETS = ("consistency", "correctness")
RULE_SPECS = (*EXIT_FUNCTION_NAMES, "classifier", "classifier-mlp", "lowrank:R", "topk:K")


def parse_rule_spec(spec: str) -> tuple[str, Optional[int]]:
    """'lowrank:64' -> ('lowrank', 64); 'max_prob' -> ('max_prob', None). ValueError names the spec."""
    if not isinstance(spec, str):
        raise TypeError(f"an exit rule spec is a string, one of {RULE_SPECS}; got {type(spec).__name__}")
    kind, _, size = spec.partition(":")
    if kind in EXIT_FUNCTION_NAMES or kind in ("classifier", "classifier-mlp"):
        if size:
            raise ValueError(f"exit rule {spec!r} takes no size; expected one of {RULE_SPECS}")
        return kind, None
    if kind in ("lowrank", "topk"):
        if not size.isdigit() or int(size) < 1:
            raise ValueError(
                f"exit rule {spec!r} needs a positive integer size, e.g. '{kind}:64'; expected one of {RULE_SPECS}"
            )
        return kind, int(size)
    raise ValueError(f"unknown exit rule {spec!r}; expected one of {RULE_SPECS}")
