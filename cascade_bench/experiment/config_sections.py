"""The run config's sections: which keys form each TOML table, and the checks of each section.

``SECTIONS`` names the tables a config file may use (``[data]``, ``[model]``, ``[training]``,
``[sweep]``, ``[exit_rules]``, ``[risk]``, ``[measurement]``, ``[runtime]``) and the keys each
holds; top-level keys still work, a key under the wrong table is an error that names its table.
``check_section(name, config)`` validates one section (a check may read other sections' keys it
depends on, e.g. the model section reads the tokenizer); ``ExperimentConfig`` runs them all in
this order. Every error names the key, what was expected and what it got.
"""

from __future__ import annotations

from typing import Callable

from ..routing.policy_names import KV_POLICIES, RISKS
from ..stages.preset_configs import STAGE_PRESETS
from ..stages.rule_specs import BUILTIN_RULE_NAMES, CLASSIFIER_TARGETS, RULE_SPECS, parse_rule_spec
from ..training.protocol_specs import EXIT_HEADS, HARD_EXAMPLES, PROTOCOLS

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
#: How the exit study fits its translators (``training.exit_translators``): ridge least squares onto the
#: last layer's stream, or that followed by cross-entropy training through the head.
TRANSLATOR_FITS = ("lstsq", "lstsq+kl")

#: Every config key, by the TOML table it belongs to.
SECTIONS: dict[str, tuple[str, ...]] = {
    "data": (
        "corpus",
        "corpus_config",
        "tokenizer",
        "seq_len",
        "batch_size",
        "eval_stride",
        "eval_split",
        "eval_batches",
        "validation_batches",
    ),
    "model": (
        "preset",
        "model",
        "boundaries",
        "block_heads",
        "exit_layers",
        "auto_boundaries",
        "translator_fit",
    ),
    "training": (
        "protocol",
        "layers",
        "layer_weights",
        "training_hard_ratios",
        "lr_decay",
        "exit_head",
        "hard_examples",
        "leaky_seed_protocol",
        "patience",
        "dense_patience",
        "max_epochs",
        "max_steps_per_epoch",
    ),
    "sweep": ("hard_ratios", "baselines", "oracle_tolerance", "batching", "kv_policies"),
    "exit_rules": ("exit_rule", "exit_rules", "classifier_target", "exit_train_tokens"),
    "risk": ("risk", "risk_delta", "risk_epsilon", "risk_nll_tolerance", "risk_batches"),
    "measurement": ("timing_repeats", "timing_batches", "count_flops", "timing_points", "plausible_ppl"),
    "runtime": ("name", "out", "device", "dtype", "threads", "seed"),
}


def section_of(key: str) -> str:
    """The table ``key`` belongs to (ValueError for a key no section holds)."""
    for name, keys in SECTIONS.items():
        if key in keys:
            return name
    raise ValueError(f"unknown config key {key!r}; known keys: {sorted(k for keys in SECTIONS.values() for k in keys)}")


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


def _bad(config, key: str, expected: str):
    raise ValueError(f"config key {key!r}: expected {expected}, got {getattr(config, key)!r}")


def _integers(config, keys, minimum: int, expected: str) -> None:
    for key in keys:
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _bad(config, key, expected)


def _check_data(c) -> None:
    _integers(c, ("seq_len", "batch_size", "eval_stride"), 1, "a positive integer")
    _integers(c, ("eval_batches", "validation_batches"), 0, "a non-negative integer (0 = no limit)")
    if c.eval_stride > c.seq_len:
        _bad(c, "eval_stride", f"at most seq_len ({c.seq_len})")
    if not isinstance(c.tokenizer, str) or not c.tokenizer:
        _bad(c, "tokenizer", "a tokenizer folder, hub name or 'bpe:<vocab size>'")
    if c.eval_split not in ("test", "validation"):
        _bad(c, "eval_split", "'test' or 'validation' (the seeds scored their hard tokens on validation)")


def _check_training(c) -> None:
    _integers(c, ("max_epochs",), 1, "a positive integer")
    _integers(c, ("max_steps_per_epoch", "dense_patience"), 0, "a non-negative integer (0 = no limit)")
    for key, what in (("patience", "one per stage"), ("layers", "layers per stage")):
        values = getattr(c, key)
        if not isinstance(values, tuple) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            _bad(c, key, f"a list of positive integers, {what} (empty: the protocol's)")
    for key in ("layer_weights", "training_hard_ratios"):
        if not isinstance(getattr(c, key), tuple) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in getattr(c, key)
        ):
            _bad(c, key, "a list of numbers (empty: the protocol's)")
    if isinstance(c.lr_decay, bool) or not isinstance(c.lr_decay, (int, float)) or not 0 <= c.lr_decay <= 1:
        _bad(c, "lr_decay", "a number in (0, 1]: stage k trains at stage 0's lr x lr_decay^k (0 = the protocol's)")
    if c.exit_head not in ("", *EXIT_HEADS):
        _bad(c, "exit_head", f"one of {list(EXIT_HEADS)} ('' = the protocol's)")
    if c.hard_examples not in ("", *HARD_EXAMPLES):
        _bad(c, "hard_examples", f"one of {list(HARD_EXAMPLES)} ('' = the protocol's)")
    if c.protocol not in PROTOCOLS:
        _bad(c, "protocol", f"one of {sorted(PROTOCOLS)}")
    stages = len(c.layers or PROTOCOLS[c.protocol].layers)
    for key in ("patience", "layer_weights"):
        if getattr(c, key) and len(getattr(c, key)) != stages:
            _bad(
                c,
                key,
                f"one entry per stage ({stages}: protocol {c.protocol!r}"
                f"{' with layers ' + str(list(c.layers)) if c.layers else ''}), or none",
            )
    if c.training_hard_ratios and len(c.training_hard_ratios) not in (1, stages - 1):
        _bad(
            c,
            "training_hard_ratios",
            f"one hard ratio for every stage boundary or one per boundary ({stages - 1}), or none",
        )
    try:
        _ = c.training_protocol  # builds it, raising what a bad key combination makes it raise
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
                "exit_rule",
            )
            if getattr(c, k)
        ]
        raise ValueError(f"config key {keys[0] if keys else 'protocol'!r}: {error}") from None


def _check_exit_rules(c) -> None:
    _integers(c, ("exit_train_tokens",), 0, "a non-negative integer (0 = no limit)")
    if c.exit_rule not in BUILTIN_RULE_NAMES:
        _bad(c, "exit_rule", f"one of {list(BUILTIN_RULE_NAMES)} ('' = the protocol's)")
    if not isinstance(c.exit_rules, tuple) or not c.exit_rules or len(set(c.exit_rules)) != len(c.exit_rules):
        _bad(c, "exit_rules", f"a non-empty list of distinct exit rules drawn from {list(RULE_SPECS)}")
    for spec in c.exit_rules:
        try:
            parse_rule_spec(spec)
        except (TypeError, ValueError) as error:
            raise ValueError(f"config key 'exit_rules': {error}") from None
    if c.classifier_target not in CLASSIFIER_TARGETS:
        _bad(c, "classifier_target", f"one of {list(CLASSIFIER_TARGETS)}")


def _check_risk(c) -> None:
    _integers(
        c,
        ("risk_batches",),
        0,
        "a non-negative integer (0 = risk control shares the validation batches the sweep calibrates on)",
    )
    if c.risk not in ("", *RISKS):
        _bad(c, "risk", f"one of {list(RISKS)} or '' (no risk-controlled points)")
    for key in ("risk_delta", "risk_epsilon"):
        value = getattr(c, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            _bad(c, key, "a number strictly between 0 and 1")
    tolerance = c.risk_nll_tolerance
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        _bad(c, "risk_nll_tolerance", "a non-negative number (nats)")
    if c.risk_batches == 1:
        _bad(
            c,
            "risk_batches",
            "0 (risk control on the shared validation batches) or at least 2 (one half "
            "proposes thresholds, the other tests them)",
        )
    if c.risk and c.risk_batches == 0 and c.validation_batches == 1:
        _bad(
            c,
            "risk_batches",
            "at least 2 when validation_batches is 1 (with risk_batches 0, risk control calibrates on the "
            "validation batches the sweep uses, and it needs at least 2: one half proposes thresholds, the "
            "other tests them)",
        )


def _check_sweep(c) -> None:
    if (
        not isinstance(c.kv_policies, tuple)
        or len(set(c.kv_policies)) != len(c.kv_policies)
        or any(policy not in KV_POLICIES for policy in c.kv_policies)
    ):
        _bad(c, "kv_policies", f"a list of distinct K/V policies drawn from {list(KV_POLICIES)} (empty: none)")
    if c.batching not in ("padded", "bucketed"):
        _bad(c, "batching", "'padded' or 'bucketed'")
    ratios = c.hard_ratios
    if (
        not isinstance(ratios, tuple)
        or not ratios
        or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1 for r in ratios)
    ):
        _bad(c, "hard_ratios", "a non-empty list of fractions strictly between 0 and 1")
    repeated = sorted({float(r) for r in ratios if sum(float(o) == float(r) for o in ratios) > 1})
    if repeated:
        _bad(c, "hard_ratios", f"distinct fractions (each is one point of the sweep; {repeated} given twice)")
    if not isinstance(c.baselines, tuple) or any(b not in METHOD_BASELINES for b in c.baselines):
        _bad(c, "baselines", f"a list drawn from {list(METHOD_BASELINES)}")
    tolerance = c.oracle_tolerance
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        _bad(c, "oracle_tolerance", "a non-negative number (nats)")


def _check_measurement(c) -> None:
    _integers(c, ("timing_repeats",), 1, "a positive integer")
    _integers(c, ("timing_batches",), 0, "a non-negative integer (0 = no limit)")
    if c.count_flops not in COUNT_FLOPS:
        _bad(c, "count_flops", f"one of {list(COUNT_FLOPS)}")
    if c.timing_points not in TIMING_POINTS:
        _bad(c, "timing_points", f"one of {list(TIMING_POINTS)}")
    plausible = c.plausible_ppl
    if (
        not isinstance(plausible, tuple)
        or len(plausible) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in plausible)
        or not 0 < plausible[0] < plausible[1]
    ):
        _bad(c, "plausible_ppl", "two numbers low,high with 0 < low < high")


def _check_runtime(c) -> None:
    _integers(c, ("threads",), 1, "a positive integer")
    _integers(c, ("seed",), 0, "a non-negative integer")
    if c.dtype not in ("float32", "bfloat16", "float16"):
        _bad(c, "dtype", "'float32', 'bfloat16' or 'float16'")
    from ..measure.environment import check_device  # imports torch: only when a config is made

    try:
        check_device(c.device, c.dtype)
    except ValueError as error:
        raise ValueError(f"config key 'device': {error}") from None


def _check_model(c) -> None:
    if c.preset not in STAGE_PRESETS:
        _bad(c, "preset", f"one of {sorted(STAGE_PRESETS)}")
    if not isinstance(c.model, str):
        _bad(c, "model", "a checkpoint folder or hub name ('' = train the preset cascade)")
    if not isinstance(c.boundaries, tuple) or any(
        isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in c.boundaries
    ):
        _bad(c, "boundaries", "a list of layer indices >= 1, e.g. [4, 8]")
    if c.block_heads not in BLOCK_HEADS:
        _bad(c, "block_heads", f"one of {list(BLOCK_HEADS)}")
    if not isinstance(c.exit_layers, tuple) or any(
        isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in c.exit_layers
    ):
        _bad(c, "exit_layers", "a list of layer indices >= 1 (the exit study's candidates), e.g. [8, 16, 24]")
    if c.translator_fit not in TRANSLATOR_FITS:
        _bad(c, "translator_fit", f"one of {list(TRANSLATOR_FITS)}")
    levels = c.auto_boundaries
    if (
        not isinstance(levels, tuple)
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1 for v in levels)
        or list(levels) != sorted(set(levels))
    ):
        _bad(c, "auto_boundaries", "increasing agreement levels strictly between 0 and 1, e.g. [0.5, 0.75]")
    if c.model:
        if not c.boundaries and not levels:
            _bad(
                c,
                "boundaries",
                "at least one layer index to cut the model at (early exit needs two blocks), or auto_boundaries",
            )
        if levels and (c.boundaries or not c.exit_layers or c.block_heads != "translator"):
            _bad(
                c,
                "auto_boundaries",
                "with boundaries unset, exit_layers set and block_heads = 'translator' (it "
                "cuts where the exit study's translators reach each agreement level)",
            )
        if c.tokenizer.startswith("bpe:"):
            _bad(c, "tokenizer", "the pretrained model's own tokenizer ('model', or a folder), not a new BPE")
        if c.block_heads == "translator" and not set(c.boundaries) <= set(c.exit_layers):
            _bad(
                c,
                "boundaries",
                f"layers among exit_layers {list(c.exit_layers)} (block_heads = 'translator' "
                f"uses the exit study's translators at the boundaries)",
            )
        return
    for key, unset in (("boundaries", ()), ("block_heads", "shared"), ("exit_layers", ()), ("auto_boundaries", ())):
        if getattr(c, key) != unset:
            _bad(c, key, "to be left unset unless 'model' is set")
    if c.tokenizer == "model":
        _bad(c, "tokenizer", "a tokenizer folder, hub name or 'bpe:<vocab size>' ('model' needs 'model' set)")


#: Each section's checks, in the order ``ExperimentConfig`` runs them (numbers and ranges first, so
#: the checks that combine keys read well-formed values).
SECTION_CHECKS: dict[str, Callable] = {
    "data": _check_data,
    "runtime": _check_runtime,
    "measurement": _check_measurement,
    "training": _check_training,
    "exit_rules": _check_exit_rules,
    "risk": _check_risk,
    "sweep": _check_sweep,
    "model": _check_model,
}


def check_section(name: str, config) -> None:
    """Validate section ``name`` of ``config`` (ValueError naming the first bad key)."""
    SECTION_CHECKS[name](config)
