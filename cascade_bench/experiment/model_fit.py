"""The run config's model-dependent settings checked against the model, before anything is trained
or measured.

``ExperimentConfig`` checks each key on its own; whether ``lowrank:32`` or a cut before layer 12 fits
is known only once the model's sizes are. ``fit_to_model`` reads them (hidden size, vocabulary,
layers) and checks every setting that depends on them: the exit rules' sizes (``lowrank:R`` needs
R <= min(hidden, vocabulary); ``topk:K`` needs K <= vocabulary), the cut (``boundaries``) and the
exit study's candidate layers (``exit_layers``: both in [1, layers - 1]). A value the user set that
does not fit stops the run with one line naming the key, the value and what fits; a default that
does not fit (the default ``exit_rules`` holds ``lowrank:32``) is dropped, and the returned notes
say so (the run prints them and records them in every result's conditions, and the report lists
them).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..data.tokenization import tokenizer_vocab_size
from ..stages.preset_configs import STAGE_PRESETS
from ..stages.rule_specs import parse_rule_spec
from .config import ExperimentConfig
from .config_sections import KEY_FIELDS


@dataclasses.dataclass(frozen=True)
class ModelSizes:
    """What the settings are checked against: the narrowest exiting stage's hidden size, the
    vocabulary, and for a pretrained model its layer count (None for a trained cascade)."""

    hidden_size: int
    vocab_size: int
    num_layers: Optional[int] = None


def _default(key: str):
    return KEY_FIELDS[key].default


def rule_misfit(spec: str, sizes: ModelSizes) -> Optional[str]:
    """Why exit rule ``spec`` cannot run on a model of ``sizes`` (None when it can)."""
    kind, size = parse_rule_spec(spec)
    return kind.misfit(size, sizes.hidden_size, sizes.vocab_size)


def fit_to_model(config: ExperimentConfig, sizes: ModelSizes) -> tuple[ExperimentConfig, list[str]]:
    """``config`` with its defaults that do not fit the model dropped, and one note per change;
    ValueError naming the key, the value and what fits for a setting the user chose."""
    notes: list[str] = []
    misfits = {spec: why for spec in config.exit_rules if (why := rule_misfit(spec, sizes))}
    if misfits:
        if config.exit_rules != _default("exit_rules"):
            spec, why = next(iter(misfits.items()))
            raise ValueError(f"config key 'exit_rules': {why}; choose a size that fits or leave {spec!r} out")
        kept = tuple(spec for spec in config.exit_rules if spec not in misfits)
        for spec, why in misfits.items():
            notes.append(
                f"exit_rules: the default rule {spec!r} dropped: {why}; set --exit-rules to choose the rules "
                f"(now {', '.join(kept)})"
            )
        config = config.replace(exit_rules=kept)
    if sizes.num_layers is not None:
        for key in ("boundaries", "exit_layers"):
            outside = [layer for layer in getattr(config, key) if not 1 <= layer <= sizes.num_layers - 1]
            if outside:
                raise ValueError(
                    f"config key {key!r}: layer indices {outside} do not fit a model of {sizes.num_layers} layers; "
                    f"expected indices in [1, {sizes.num_layers - 1}]"
                )
    return config, notes


def model_sizes(config: ExperimentConfig, pretrained, tokenizer) -> ModelSizes:
    """The sizes of the model ``config`` runs: the pretrained model's own (its text config), or the
    preset's hidden size with the tokenizer's vocabulary for a cascade trained here."""
    if pretrained is not None:
        text = pretrained.config.get_text_config()
        vocab = pretrained.get_output_embeddings().weight.shape[0]
        return ModelSizes(int(text.hidden_size), int(vocab), int(text.num_hidden_layers))
    preset = STAGE_PRESETS[config.preset]
    return ModelSizes(int(preset["hidden_size"]), tokenizer_vocab_size(tokenizer))
