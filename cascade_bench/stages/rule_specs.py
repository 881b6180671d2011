"""Every kind of exit rule, in one registry without torch (the command line's choices and the run
config's checks read it; ``exit_rules`` builds what each kind stands for).

A rule is named by a spec: a kind's name, with ``:N`` for a kind that takes a size (``lowrank:64``,
``topk:1024``). ``RULE_KINDS`` says, per kind, everything the rest of the package asks about it:
how it is built (``family``: a built-in confidence function, a classifier trained on the stage's
states, or a reduced copy of the stage's own head), what its size means and what bounds it, and
whether it approximates max_prob. An unknown name is a ValueError that lists what exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: How a kind becomes a rule: one of the built-in functions (``exits``), an ``ExitClassifier``
#: trained per stage, or a ``ReducedHeadMaxProb`` cut from the stage's own head (a rank-R
#: factorisation of it, or its rows for K candidate tokens).
BUILTIN, CLASSIFIER, LOW_RANK_HEAD, TOP_K_HEAD = "builtin", "classifier", "low_rank_head", "top_k_head"
#: What a learned exit classifier predicts.
CLASSIFIER_TARGETS = ("consistency", "correctness")
#: Hidden units of the ``classifier-mlp`` kind (0: a linear classifier).
MLP_HIDDEN_UNITS = 64


@dataclass(frozen=True)
class RuleKind:
    """One kind of exit rule. ``size``: what ``:N`` sets (None: the kind takes no size);
    ``hidden_units``: a classifier's hidden layer (0: linear)."""

    name: str
    family: str
    summary: str
    size: Optional[str] = None
    hidden_units: int = 0

    @property
    def spec_form(self) -> str:
        """How a spec of this kind is written: ``max_prob``, ``lowrank:R``."""
        return f"{self.name}:{self.size}" if self.size else self.name

    @property
    def trained(self) -> bool:
        """Whether the rule is trained (per stage, on the stage's states) before it is used."""
        return self.family == CLASSIFIER

    @property
    def approximates_max_prob(self) -> bool:
        """Whether its confidence is max_prob over a cheaper head (agreement with max_prob is reported)."""
        return self.family in (LOW_RANK_HEAD, TOP_K_HEAD)

    def misfit(self, size: Optional[int], hidden_size: int, vocab_size: int) -> Optional[str]:
        """Why a rule of this kind and ``size`` cannot run on a model of these sizes (None: it can)."""
        if self.family == LOW_RANK_HEAD:
            upper = min(hidden_size, vocab_size)
            smaller = f"the smaller of the hidden size {hidden_size} and the vocabulary {vocab_size}"
            what = f"a rank in [1, {upper}] ({smaller})"
        elif self.family == TOP_K_HEAD:
            upper, what = vocab_size, f"K in [1, {vocab_size}] (the vocabulary)"
        else:
            return None
        return None if 1 <= size <= upper else f"'{self.name}:{size}' needs {what}"


RULE_KINDS: dict[str, RuleKind] = {
    kind.name: kind
    for kind in (
        RuleKind("cos_sim", BUILTIN, "cosine similarity of the stage's input and output states (no logits)"),
        RuleKind("margin", BUILTIN, "top-1 minus top-2 probability"),
        RuleKind("max_prob", BUILTIN, "top-1 probability"),
        RuleKind("neg_entropy", BUILTIN, "negative entropy of the next-token distribution"),
        RuleKind("classifier", CLASSIFIER, "a linear classifier on the stage's states, trained per stage"),
        RuleKind(
            "classifier-mlp",
            CLASSIFIER,
            f"a classifier with {MLP_HIDDEN_UNITS} hidden units, trained per stage",
            hidden_units=MLP_HIDDEN_UNITS,
        ),
        RuleKind("lowrank", LOW_RANK_HEAD, "max_prob through a rank-R factorisation of the head", size="R"),
        RuleKind("topk", TOP_K_HEAD, "max_prob over the K most frequent tokens' rows of the head", size="K"),
    )
}
#: The built-in exit rules' names (``exits.BUILTIN_EXIT_RULES``, which is checked against this).
BUILTIN_RULE_NAMES = tuple(name for name, kind in RULE_KINDS.items() if kind.family == BUILTIN)
#: Every spec form, as the command line and the config's messages list them.
RULE_SPECS = tuple(kind.spec_form for kind in RULE_KINDS.values())


def parse_rule_spec(spec: str) -> tuple[RuleKind, Optional[int]]:
    """'lowrank:64' -> (the lowrank kind, 64); 'max_prob' -> (the max_prob kind, None). ValueError
    names the spec and lists the forms that exist."""
    if not isinstance(spec, str):
        raise TypeError(f"an exit rule spec is a string, one of {RULE_SPECS}; got {type(spec).__name__}")
    if "," in spec:
        raise ValueError(
            f"exit rule {spec!r} holds a comma; give several rules space-separated (`--exit-rules max_prob "
            f'cos_sim`, TOML `exit_rules = ["max_prob", "cos_sim"]`), each one of {RULE_SPECS}'
        )
    name, colon, size = spec.partition(":")
    kind = RULE_KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown exit rule {spec!r}; expected one of {RULE_SPECS}")
    if kind.size is None:
        if colon:
            raise ValueError(f"exit rule {spec!r} takes no size; expected one of {RULE_SPECS}")
        return kind, None
    if not size.isdigit() or int(size) < 1:
        raise ValueError(
            f"exit rule {spec!r} needs a positive integer size, e.g. '{name}:64'; expected one of {RULE_SPECS}"
        )
    return kind, int(size)
