"""The run config's sections: one frozen dataclass per TOML table, each key declared once (its
default, its one line of ``--help`` and its choices, in the field), and each section checking its own
keys when it is made. ``ExperimentConfig`` (``config``) is composed of them and checks what ties
two sections together.

The tables: ``[data]``, ``[stages]``, ``[training]``, ``[sweep]``, ``[exits]``, ``[risk_control]``,
``[measurement]``, ``[runtime]`` (``SECTION_TYPES``). Top-level keys work too; a key under another
table than its own is an error naming its table. Every error names the key, what was expected and
what it got.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from ..routing.policy_names import KV_POLICIES, RISKS
from ..stages.preset_configs import STAGE_PRESETS
from ..stages.rule_specs import BUILTIN_RULE_NAMES, CLASSIFIER_TARGETS, RULE_SPECS, parse_rule_spec
from ..training.protocol_specs import EXIT_HEADS, HARD_EXAMPLES, PROTOCOLS, decayed_lrs

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
#: How LaTeX tables write a value with its interval: ``33.56 \pm 0.21`` (half the interval's width,
#: which is symmetric only approximately: the Markdown and CSV tables keep both ends) or ``33.56 [33.35, 33.77]``.
LATEX_INTERVALS = ("pm", "brackets")
#: How the exit study fits its translators (``training.exit_translators``): ridge least squares onto the
#: last layer's stream, or that followed by cross-entropy training through the head.
TRANSLATOR_FITS = ("lstsq", "lstsq+kl")
EVAL_SPLITS = ("test", "validation")
BATCHINGS = ("padded", "bucketed")
DTYPES = ("float32", "bfloat16", "float16")


def _key(default: Any, help: str, choices: tuple = ()) -> Any:
    """A config key: its default, its one line of ``--help`` (plain text) and the values it takes."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices)})


def refuse(holder, key: str, expected: str):
    """ValueError naming config key ``key`` (read from ``holder``: a section or the config), what was
    expected and what it holds."""
    raise ValueError(f"config key {key!r}: expected {expected}, got {getattr(holder, key)!r}")


class Section:
    """What every section shares: it checks itself when made (``check``), names its keys and their
    element types, and writes them flat."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        raise NotImplementedError

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def element_type(cls, key: str) -> type:
        """The element type of list key ``key`` (from its annotation ``tuple[int, ...]``)."""
        return typing.get_args(typing.get_type_hints(cls)[key])[0]

    def _bad(self, key: str, expected: str):
        refuse(self, key, expected)

    def _integers(self, keys, minimum: int, expected: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                self._bad(key, expected)

    def _fraction_between(self, key: str, low: float, high: float, expected: str) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
            self._bad(key, expected)

    def _number_at_least(self, key: str, minimum: float, expected: str) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            self._bad(key, expected)

    def _one_of(self, key: str, allowed: tuple, expected: str = "") -> None:
        if getattr(self, key) not in allowed:
            self._bad(key, expected or f"one of {list(allowed)}")


@dataclass(frozen=True)
class DataSection(Section):
    """``[data]``: the text, its tokenizer and windows, and which batches are scored."""

    corpus: str = _key(
        "embedded", "the text: 'embedded' (offline), a text file, a folder of split files, or a hub data set"
    )
    corpus_config: str = _key("", "the hub data set's config name (e.g. wikitext-2-raw-v1); '' for none")
    tokenizer: str = _key(
        "bpe:1024",
        "'bpe:N' (a BPE of N ids trained on the train split), a tokenizer folder, or 'model' (the pretrained "
        "model's own)",
    )
    seq_len: int = _key(128, "tokens per window")
    batch_size: int = _key(8, "windows per batch")
    eval_stride: int = _key(
        0, "tokens between evaluation windows (0 = half a window: each scored token has half a window of context)"
    )
    eval_split: str = _key("test", "the split the sweep scores", choices=EVAL_SPLITS)
    eval_batches: int = _key(
        0, "score the first N batches of the scored split (0 = all): the cheapest way to a quick run"
    )
    validation_batches: int = _key(
        0, "calibrate thresholds, risk-control and early-stop exit rules on the first N validation batches (0 = all)"
    )

    def __post_init__(self) -> None:
        # eval_stride 0 = half the window, resolved here so the stored config holds what ran
        if self.eval_stride == 0 and isinstance(self.seq_len, int) and not isinstance(self.seq_len, bool):
            object.__setattr__(self, "eval_stride", max(1, self.seq_len // 2))
        super().__post_init__()

    def check(self) -> None:
        self._integers(("seq_len", "batch_size", "eval_stride"), 1, "a positive integer")
        self._integers(("eval_batches", "validation_batches"), 0, "a non-negative integer (0 = no limit)")
        if self.eval_stride > self.seq_len:
            self._bad("eval_stride", f"at most seq_len ({self.seq_len})")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            self._bad("tokenizer", "a tokenizer folder, hub name or 'bpe:<vocab size>'")
        self._one_of(
            "eval_split", EVAL_SPLITS, "'test' or 'validation' (the seeds scored their hard tokens on validation)"
        )


@dataclass(frozen=True)
class StagesSection(Section):
    """``[stages]``: the stages' preset when the cascade is trained here, or the pretrained model cut
    into blocks and how its blocks exit."""

    preset: str = _key(
        "gpt2-mini", "the stages' architecture when the cascade is trained here", choices=tuple(sorted(STAGE_PRESETS))
    )
    model: str = _key(
        "",
        "early exit inside a pretrained causal LM instead: a local folder, a hub name, gguf:FILE or "
        "pypi:DISTRIBUTION ('' = train the preset cascade)",
    )
    boundaries: tuple[int, ...] = _key(
        (), "with model: cut before these layer indices (e.g. 4 8 on 12 layers gives 4/4/4)"
    )
    block_heads: str = _key(
        "shared",
        "with model: how non-last blocks exit: the model's own norm + head, heads trained here, or the exit "
        "study's translators",
        choices=BLOCK_HEADS,
    )
    exit_layers: tuple[int, ...] = _key(
        (),
        "with model: the exit study's candidate layers (every layer through the shared head, a translator "
        "fitted at each candidate); each costs one fit",
    )
    auto_boundaries: tuple[float, ...] = _key(
        (),
        "with model: instead of boundaries, cut at the first candidate whose translator agrees with full depth "
        "on this share of validation tokens",
    )
    translator_fit: str = _key(
        "lstsq",
        "how the exit study fits translators: ridge least squares (seconds), or that then trained by KL to the "
        "full model's top-k (lstsq+kl: up to 360 s, train-exits' recipe)",
        choices=TRANSLATOR_FITS,
    )
    exit_study_batches: int = _key(
        0,
        "with model: the exit study's curve on the first N scored batches (0 = every scored batch); each "
        "costs one pass through every layer's head",
    )

    def check(self) -> None:
        self._integers(("exit_study_batches",), 0, "a non-negative integer (0 = every scored batch)")
        self._one_of("preset", tuple(STAGE_PRESETS), f"one of {sorted(STAGE_PRESETS)}")
        if not isinstance(self.model, str):
            self._bad("model", "a checkpoint folder or hub name ('' = train the preset cascade)")
        self._layer_indices("boundaries", "a list of layer indices >= 1, e.g. [4, 8]")
        self._one_of("block_heads", BLOCK_HEADS)
        self._layer_indices(
            "exit_layers", "a list of layer indices >= 1 (the exit study's candidates), e.g. [8, 16, 24]"
        )
        self._one_of("translator_fit", TRANSLATOR_FITS)
        levels = self.auto_boundaries
        if (
            not isinstance(levels, tuple)
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1 for v in levels)
            or list(levels) != sorted(set(levels))
        ):
            self._bad("auto_boundaries", "increasing agreement levels strictly between 0 and 1, e.g. [0.5, 0.75]")
        if self.model:
            self._check_cut()
            return
        for key, unset in (("boundaries", ()), ("block_heads", "shared"), ("exit_layers", ()), ("auto_boundaries", ())):
            if getattr(self, key) != unset:
                self._bad(key, "to be left unset unless 'model' is set")

    def _layer_indices(self, key: str, expected: str) -> None:
        values = getattr(self, key)
        if not isinstance(values, tuple) or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values):
            self._bad(key, expected)

    def _check_cut(self) -> None:
        """Where a pretrained model is cut: boundaries, or automatic cuts at the exit study's layers."""
        levels = self.auto_boundaries
        if not self.boundaries and not levels:
            self._bad(
                "boundaries",
                "at least one layer index to cut the model at (early exit needs two blocks), or auto_boundaries",
            )
        if levels and (self.boundaries or not self.exit_layers or self.block_heads != "translator"):
            self._bad(
                "auto_boundaries",
                "with boundaries unset, exit_layers set and block_heads = 'translator' (it "
                "cuts where the exit study's translators reach each agreement level)",
            )
        if self.block_heads == "translator" and not set(self.boundaries) <= set(self.exit_layers):
            self._bad(
                "boundaries",
                f"layers among exit_layers {list(self.exit_layers)} (block_heads = 'translator' "
                f"uses the exit study's translators at the boundaries)",
            )


@dataclass(frozen=True)
class TrainingSection(Section):
    """``[training]``: the protocol the cascade is trained with, changed key by key (each empty value
    means the protocol's own), and the caps on training."""

    protocol: str = _key("ashem", "the training protocol of the cascade trained here", choices=tuple(sorted(PROTOCOLS)))
    layers: tuple[int, ...] = _key((), "layers per stage ('' = the protocol's)")
    layer_weights: tuple[float, ...] = _key((), "joint training's loss weight per stage ('' = the protocol's)")
    training_hard_ratios: tuple[float, ...] = _key(
        (), "share of tokens later stages train on, one or one per boundary ('' = the protocol's)"
    )
    lr_decay: float = _key(0.0, "stage k trains at stage 0's learning rate x lr_decay^k (0 = the protocol's)")
    exit_head: str = _key(
        "", "a later stage's exit head: a copy of the earlier one or frozen ('' = the protocol's)", choices=EXIT_HEADS
    )
    hard_examples: str = _key(
        "",
        "what later stages train on: hard tokens or whole hard sequences ('' = the protocol's)",
        choices=HARD_EXAMPLES,
    )
    leaky_seed_protocol: bool = _key(
        False,
        "the seeds' leaky protocol: hard tokens collected from validation and scored there (for reproducing "
        "their figures only)",
    )
    patience: tuple[int, ...] = _key((), "early-stopping patience per stage ('' = the protocol's)")
    dense_patience: int = _key(0, "the dense baseline's early-stopping patience (0 = stage 0's)")
    max_epochs: int = _key(40, "safety cap on epochs per trained part (a part that reaches it is flagged)")
    max_steps_per_epoch: int = _key(0, "cap on steps per epoch (0 = whole epochs; capped epochs are flagged)")

    def check(self) -> None:
        self._integers(("max_epochs",), 1, "a positive integer")
        self._integers(("max_steps_per_epoch", "dense_patience"), 0, "a non-negative integer (0 = no limit)")
        for key, what in (("patience", "one per stage"), ("layers", "layers per stage")):
            values = getattr(self, key)
            if not isinstance(values, tuple) or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values
            ):
                self._bad(key, f"a list of positive integers, {what} (empty: the protocol's)")
        for key in ("layer_weights", "training_hard_ratios"):
            if not isinstance(getattr(self, key), tuple) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) for v in getattr(self, key)
            ):
                self._bad(key, "a list of numbers (empty: the protocol's)")
        if (
            isinstance(self.lr_decay, bool)
            or not isinstance(self.lr_decay, (int, float))
            or not 0 <= self.lr_decay <= 1
        ):
            self._bad(
                "lr_decay", "a number in (0, 1]: stage k trains at stage 0's lr x lr_decay^k (0 = the protocol's)"
            )
        self._one_of("exit_head", ("", *EXIT_HEADS), f"one of {list(EXIT_HEADS)} ('' = the protocol's)")
        self._one_of("hard_examples", ("", *HARD_EXAMPLES), f"one of {list(HARD_EXAMPLES)} ('' = the protocol's)")
        self._one_of("protocol", tuple(PROTOCOLS), f"one of {sorted(PROTOCOLS)}")
        self._check_per_stage()
        try:
            _ = self.training_protocol  # builds it, raising what a bad key combination makes it raise
        except ValueError as error:
            changed = [k for k in _PROTOCOL_CHANGES if getattr(self, k)]
            raise ValueError(f"config key {changed[0] if changed else 'protocol'!r}: {error}") from None

    def _check_per_stage(self) -> None:
        """The keys given per stage (or per stage boundary) have one entry each, or none."""
        stages = len(self.layers or PROTOCOLS[self.protocol].layers)
        for key in ("patience", "layer_weights"):
            if getattr(self, key) and len(getattr(self, key)) != stages:
                self._bad(
                    key,
                    f"one entry per stage ({stages}: protocol {self.protocol!r}"
                    f"{' with layers ' + str(list(self.layers)) if self.layers else ''}), or none",
                )
        if self.training_hard_ratios and len(self.training_hard_ratios) not in (1, stages - 1):
            self._bad(
                "training_hard_ratios",
                f"one hard ratio for every stage boundary or one per boundary ({stages - 1}), or none",
            )

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
        changes: dict = {}
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


#: The training keys that change the protocol's recipe (named when the combination does not build).
_PROTOCOL_CHANGES = (
    "layers",
    "patience",
    "layer_weights",
    "training_hard_ratios",
    "lr_decay",
    "exit_head",
    "hard_examples",
)


@dataclass(frozen=True)
class SweepSection(Section):
    """``[sweep]``: the hard ratios swept, the baselines beside them, and how tokens are batched."""

    hard_ratios: tuple[float, ...] = _key(
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        "the sweep's hard ratios: the share of tokens that continue past stage 0, one point each",
    )
    baselines: tuple[str, ...] = _key(
        METHOD_BASELINES, "the reference points to measure beside the sweep", choices=METHOD_BASELINES
    )
    oracle_tolerance: float = _key(
        0.0, "the oracle exits a token once its NLL is within this many nats of the last stage's"
    )
    batching: str = _key(
        "bucketed",
        "how the tokens continuing to a stage are batched: padded rows, or buckets of similar length",
        choices=BATCHINGS,
    )
    kv_policies: tuple[str, ...] = _key(
        KV_POLICIES,
        "K/V policies for exited tokens, one point each at the anchor hard ratio (none given: none)",
        choices=KV_POLICIES,
    )

    def check(self) -> None:
        policies = self.kv_policies
        if (
            not isinstance(policies, tuple)
            or len(set(policies)) != len(policies)
            or not set(policies) <= set(KV_POLICIES)
        ):
            self._bad("kv_policies", f"a list of distinct K/V policies drawn from {list(KV_POLICIES)} (empty: none)")
        self._one_of("batching", BATCHINGS, "'padded' or 'bucketed'")
        ratios = self.hard_ratios
        if (
            not isinstance(ratios, tuple)
            or not ratios
            or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1 for r in ratios)
        ):
            self._bad("hard_ratios", "a non-empty list of fractions strictly between 0 and 1")
        repeated = sorted({float(r) for r in ratios if sum(float(o) == float(r) for o in ratios) > 1})
        if repeated:
            self._bad("hard_ratios", f"distinct fractions (each is one point of the sweep; {repeated} given twice)")
        if not isinstance(self.baselines, tuple) or not set(self.baselines) <= set(METHOD_BASELINES):
            self._bad("baselines", f"a list drawn from {list(METHOD_BASELINES)}")
        self._number_at_least("oracle_tolerance", 0, "a non-negative number (nats)")


@dataclass(frozen=True)
class ExitsSection(Section):
    """``[exits]``: the exit rule the cascade trains with, every rule swept on it, and what the
    learned rules train on."""

    exit_rule: str = _key(
        "", "the rule the cascade trains and is swept with ('' = the protocol's)", choices=BUILTIN_RULE_NAMES
    )
    exit_rules: tuple[str, ...] = _key(
        ("max_prob", "cos_sim", "classifier", "lowrank:32"),
        "every rule swept on the trained cascade (lowrank:R needs R <= the hidden size; topk:K needs K <= the "
        "vocabulary)",
        choices=RULE_SPECS,
    )
    classifier_target: str = _key("consistency", "what a learned exit classifier predicts", choices=CLASSIFIER_TARGETS)
    exit_train_tokens: int = _key(0, "train tokens for translators and exit classifiers (0 = the whole train split)")

    def check(self) -> None:
        self._integers(("exit_train_tokens",), 0, "a non-negative integer (0 = no limit)")
        self._one_of("exit_rule", ("", *BUILTIN_RULE_NAMES), f"one of {list(BUILTIN_RULE_NAMES)} ('' = the protocol's)")
        rules = self.exit_rules
        if not isinstance(rules, tuple) or not rules or len(set(rules)) != len(rules):
            self._bad("exit_rules", f"a non-empty list of distinct exit rules drawn from {list(RULE_SPECS)}")
        for spec in rules:
            try:
                parse_rule_spec(spec)
            except (TypeError, ValueError) as error:
                raise ValueError(f"config key 'exit_rules': {error}") from None
        self._one_of("classifier_target", CLASSIFIER_TARGETS)


@dataclass(frozen=True)
class RiskControlSection(Section):
    """``[risk_control]``: the risk one point per rule controls, its guarantee, and the validation
    batches held out for it."""

    risk: str = _key(
        "disagreement", "the risk to control with one risk-controlled point per rule ('' = none)", choices=RISKS
    )
    risk_delta: float = _key(0.1, "the risk level the controlled thresholds must keep")
    risk_epsilon: float = _key(0.1, "the probability the guarantee may fail")
    risk_nll_tolerance: float = _key(0.0, "for risk 'nll_increase': the NLL increase (nats) counted as harm")
    risk_batches: int = _key(
        4,
        "the last N validation batches held out for risk control alone: 0 (share the sweep's validation "
        "batches, at least 2 of them) or at least 2",
    )

    def check(self) -> None:
        self._integers(
            ("risk_batches",),
            0,
            "a non-negative integer (0 = risk control shares the validation batches the sweep calibrates on)",
        )
        self._one_of("risk", ("", *RISKS), f"one of {list(RISKS)} or '' (no risk-controlled points)")
        for key in ("risk_delta", "risk_epsilon"):
            self._fraction_between(key, 0, 1, "a number strictly between 0 and 1")
        self._number_at_least("risk_nll_tolerance", 0, "a non-negative number (nats)")
        if self.risk_batches == 1:
            self._bad(
                "risk_batches",
                "0 (risk control on the shared validation batches) or at least 2 (one half "
                "proposes thresholds, the other tests them)",
            )


@dataclass(frozen=True)
class MeasurementSection(Section):
    """``[measurement]``: where and how often time and FLOPs are measured, and the plausible PPLs."""

    timing_repeats: int = _key(3, "timed repeats per point (the median is reported)")
    timing_batches: int = _key(8, "test batches each point's wall time covers (0 = all)")
    count_flops: str = _key(
        "anchors", "where FLOPs are counted by running (the analytic count is everywhere)", choices=COUNT_FLOPS
    )
    timing_points: str = _key("all", "where wall time is measured", choices=TIMING_POINTS)
    plausible_ppl: tuple[float, ...] = _key((5.0, 1000.0), "low high: perplexities outside are flagged in the checks")
    interval_resamples: int = _key(
        2000, "bootstrap resamples behind every confidence interval, >= 100 (seeded by seed)"
    )
    interval_level: float = _key(0.95, "confidence level of every interval, in [0.5, 1)")
    latex_intervals: str = _key(
        "pm", "LaTeX tables write an interval as x \\pm h ('pm') or x [lo, hi]", choices=LATEX_INTERVALS
    )
    reuse_memory_mb: int = _key(
        2048, "MiB the sweep may keep of stage work shared by its points (0 = none; the records are the same)"
    )

    def check(self) -> None:
        self._integers(("interval_resamples",), 100, "an integer >= 100")
        self._integers(("reuse_memory_mb",), 0, "a non-negative integer (0 = keep nothing)")
        self._one_of("latex_intervals", LATEX_INTERVALS)
        level = self.interval_level
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.5 <= level < 1:
            self._bad("interval_level", "a number in [0.5, 1)")
        self._integers(("timing_repeats",), 1, "a positive integer")
        self._integers(("timing_batches",), 0, "a non-negative integer (0 = no limit)")
        self._one_of("count_flops", COUNT_FLOPS)
        self._one_of("timing_points", TIMING_POINTS)
        plausible = self.plausible_ppl
        if (
            not isinstance(plausible, tuple)
            or len(plausible) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in plausible)
            or not 0 < plausible[0] < plausible[1]
        ):
            self._bad("plausible_ppl", "two numbers low,high with 0 < low < high")


@dataclass(frozen=True)
class RuntimeSection(Section):
    """``[runtime]``: the run's name and folder, the device, type, threads and seed."""

    name: str = _key("ashem-embedded", "the run's name: its results, plots and report are named by it")
    out: str = _key(".", "the folder for results/, plots/, models/ and the report")
    device: str = _key("cpu", "cpu, cuda or cuda:N")
    dtype: str = _key("float32", "the models' floating-point type", choices=DTYPES)
    threads: int = _key(2, "torch CPU threads")
    seed: int = _key(0, "random seed of training and sampling")

    def check(self) -> None:
        self._integers(("threads",), 1, "a positive integer")
        self._integers(("seed",), 0, "a non-negative integer")
        self._one_of("dtype", DTYPES, "'float32', 'bfloat16' or 'float16'")
        from ..measure.environment import check_device  # imports torch: only when a config is made

        try:
            check_device(self.device, self.dtype)
        except ValueError as error:
            raise ValueError(f"config key 'device': {error}") from None


#: Every section by its TOML table, in the order a config is made (and its keys listed).
SECTION_TYPES: dict[str, type[Section]] = {
    "data": DataSection,
    "stages": StagesSection,
    "training": TrainingSection,
    "sweep": SweepSection,
    "exits": ExitsSection,
    "risk_control": RiskControlSection,
    "measurement": MeasurementSection,
    "runtime": RuntimeSection,
}
#: Every config key, by the table it belongs to.
SECTIONS: dict[str, tuple[str, ...]] = {name: section.keys() for name, section in SECTION_TYPES.items()}
#: The table each key belongs to.
KEY_SECTIONS: dict[str, str] = {key: name for name, keys in SECTIONS.items() for key in keys}
#: Every key's field (its default and metadata: help, choices), flat.
KEY_FIELDS: dict[str, dataclasses.Field] = {f.name: f for section in SECTION_TYPES.values() for f in fields(section)}


def section_of(key: str) -> str:
    """The table ``key`` belongs to (ValueError for a key no section holds)."""
    if key not in KEY_SECTIONS:
        raise ValueError(unknown_key(key))
    return KEY_SECTIONS[key]


def unknown_key(key: str) -> str:
    """The message for a key no section holds: the nearest known keys, and where all are listed."""
    import difflib

    near = difflib.get_close_matches(key, KEY_SECTIONS, n=3)
    hint = f"did you mean {' or '.join(repr(k) for k in near)}? " if near else ""
    return (
        f"unknown config key {key!r}; {hint}every key is a flag of `cascade-bench run --help`, and "
        f"configs/default.toml writes each under its table"
    )


def flatten_tables(raw: dict, source: str) -> dict:
    """Key/value pairs of a parsed TOML file: top-level keys as they are, each table's keys checked
    against ``SECTIONS`` (an unknown table, or a key under another table than its own, names both)."""
    flat = {}
    for key, value in raw.items():
        if not isinstance(value, dict):
            flat[key] = value
            continue
        if key not in SECTIONS:
            tables = ", ".join(f"[{name}]" for name in SECTIONS)
            raise ValueError(f"{source}: unknown table [{key}]; the tables are {tables}")
        for inner in value:
            if inner not in SECTIONS[key]:
                raise ValueError(f"{source}: key {inner!r} is not a [{key}] key; it belongs in [{section_of(inner)}]")
    for key, value in raw.items():
        if isinstance(value, dict):
            twice = sorted(set(value) & set(flat))
            if twice:
                raise ValueError(
                    f"{source}: key {twice[0]!r} is set both at the top level ({flat[twice[0]]!r}) and in "
                    f"[{key}] ({value[twice[0]]!r}); set it once"
                )
            flat.update(value)
    return flat


def check_across_sections(config) -> None:
    """The checks that tie two sections together (each section has checked its own keys): the
    tokenizer a pretrained model needs, and the validation batches risk control needs."""

    if config.model and config.tokenizer.startswith("bpe:"):
        refuse(config, "tokenizer", "the pretrained model's own tokenizer ('model', or a folder), not a new BPE")
    if not config.model and config.tokenizer == "model":
        refuse(config, "tokenizer", "a tokenizer folder, hub name or 'bpe:<vocab size>' ('model' needs 'model' set)")
    if config.risk and config.risk_batches == 0 and config.validation_batches == 1:
        refuse(
            config,
            "risk_batches",
            "at least 2 when validation_batches is 1 (with risk_batches 0, risk control calibrates on the "
            "validation batches the sweep uses, and it needs at least 2: one half proposes thresholds, the "
            "other tests them)",
        )
