"""The record every point of a sweep writes: one typed row per point, the oracle included.

Fields come in three groups, and ``as_dict`` writes them by group so the JSON lines keep one shape:

- *core* fields every record has (the oracle's pass-only ones are null: it is a bound, not a pass);
- *pass* fields every measured pass has (every method but the oracle);
- *extra* fields that belong to some methods only (a prefix's stage count, a rule's training, a K/V
  policy's token counts, risk control's summary, the back-to-back wall ratio of a timed point),
  written when set.

``SCHEMA_VERSION`` is the version the results store writes (it reads ``READ_SCHEMA_VERSIONS``). ``record_differences``
compares two runs' records on everything but what the clock decides (wall times, throughput, peak
memory, the environment): the same config on the same data must give the same records.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Sequence

SCHEMA_VERSION = 3
#: Versions the store reads: 2 lacks the intervals and the wall ratio's pairs (its records read with
#: them None; the tables then show no interval).
READ_SCHEMA_VERSIONS = (2, 3)


class Method(str, Enum):
    """What a point measures. A ``str`` so records, tables and JSON lines keep the plain name."""

    FULL = "full"
    PREFIX = "prefix"
    DENSE = "dense"
    ROUTED = "routed"
    MASKED = "masked"
    RISK_CONTROLLED = "risk_controlled"
    KV_ROUTED = "kv_routed"
    ORACLE = "oracle"

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def of(cls, name: "str | Method") -> "Method":
        """The method named ``name``; ValueError listing the methods for an unknown one."""
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown method {name!r}; expected one of {[m.value for m in cls]}") from None


def _core(default=None):
    return field(default=default, metadata={"group": "core"})


def _pass(default=None):
    return field(default=default, metadata={"group": "pass"})


def _extra(default=None):
    return field(default=default, metadata={"group": "extra"})


@dataclass
class Record:
    """One measured point (``method`` one of full, prefix, dense, routed, masked, risk_controlled,
    kv_routed, oracle). ``hard_ratio``: the swept ratio, risk control's choice, or None."""

    point_id: str = _core()
    method: Method = _core()
    hard_ratio: Optional[float] = _core()
    thresholds: Optional[list] = _pass()
    layers_per_stage: list = _core()
    tokens: int = _core()
    routed_tokens: Optional[int] = _pass()
    ppl: float = _core()
    accuracy: Optional[float] = _core()
    hard_ppl: Optional[float] = _pass()
    easy_ppl: Optional[float] = _pass()
    hard_ppl_stage0: Optional[float] = _pass()
    hard_tokens: Optional[int] = _pass()
    exit_ratios: list = _core()
    tokens_entered: list = _core()
    tokens_exited: Optional[list] = _pass()
    layer_cost: float = _core()
    padding_waste: Optional[list] = _pass()
    flops: Optional[int] = _core()
    flops_analytic: Optional[int] = _core()
    #: analytic FLOPs of the timed batches alone (what the wall time covers); None when not timed
    flops_analytic_timed: Optional[int] = _pass()
    time_median_s: Optional[float] = _core()
    time_iqr_s: Optional[float] = _pass()
    tokens_per_s: Optional[float] = _pass()
    peak_memory_bytes: Optional[int] = _pass()
    memory_measure: Optional[str] = _pass()
    decision_flops: Optional[int] = _pass()
    counting_overhead: Optional[float] = _pass()
    conditions: dict = _core()
    stages: Optional[int] = _extra()
    exit_rule: Optional[str] = _extra()
    rule_training: Optional[dict] = _extra()
    agreement_with_max_prob: Optional[float] = _extra()
    risk_control: Optional[dict] = _extra()
    realised_risk: Optional[float] = _extra()
    realised_violations: Optional[int] = _extra()
    kv_policy: Optional[str] = _extra()
    batching: Optional[str] = _extra()
    tokens_computed: Optional[list] = _extra()
    tokens_propagated: Optional[list] = _extra()
    oracle_tolerance: Optional[float] = _extra()
    wall_ratio_interleaved: Optional[float] = _extra()
    #: every back-to-back pair's wall ratio (all ranks), sorted, and a bootstrap interval of their median
    wall_ratio_pairs: Optional[list] = _extra()
    wall_ratio_interval: Optional[list] = _extra()
    #: confidence intervals of the quality figures over evaluation windows and of the paired differences
    #: from full depth (``measure.intervals.quality_intervals``); risk control adds its realised risk's
    intervals: Optional[dict] = _extra()

    @classmethod
    def of_cost(cls, point_id: str, method: Method, cost, hard_ratio: Optional[float] = None, **extra) -> "Record":
        """The record of a measured pass (a ``cost.measurement.CostRecord``): ``QUALITY_FIELDS`` from
        its quality, ``COST_FIELDS`` from the cost, ``extra`` as given."""
        taken = {name: _plain(getattr(cost.quality, name)) for name in QUALITY_FIELDS}
        taken.update({name: getattr(cost, name) for name in COST_FIELDS})
        return cls(point_id=point_id, method=Method.of(method), hard_ratio=hard_ratio, **taken, **extra)

    def __post_init__(self):
        self.method = Method.of(self.method)

    @property
    def is_pass(self) -> bool:
        """Whether the record measured a forward pass (everything but the oracle's bound)."""
        return self.method != Method.ORACLE

    @property
    def timed(self) -> bool:
        return bool((self.conditions or {}).get("timed", True))

    def as_dict(self) -> dict:
        """The JSON line's fields (without the schema version, which the store adds)."""
        written = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            group = f.metadata["group"]
            if group == "core" or (group == "pass" and self.is_pass) or value is not None:
                written[f.name] = value.value if isinstance(value, Method) else value
        return written

    @classmethod
    def from_dict(cls, row: dict) -> "Record":
        """A stored line back as a record; a key this schema does not know is an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(row) - known - {"schema_version"})
        if unknown:
            raise ValueError(f"record {row.get('point_id')!r} has fields {unknown} that schema {SCHEMA_VERSION} lacks")
        return cls(**{k: v for k, v in row.items() if k in known})


#: The fields of a measured pass's record read from its quality (``routing.evaluation.EvalResult``).
QUALITY_FIELDS = (
    "thresholds",
    "layers_per_stage",
    "tokens",
    "routed_tokens",
    "ppl",
    "accuracy",
    "hard_ppl",
    "easy_ppl",
    "hard_ppl_stage0",
    "hard_tokens",
    "exit_ratios",
    "tokens_entered",
    "tokens_exited",
    "layer_cost",
    "padding_waste",
)
#: The fields read from the pass's cost (``cost.measurement.CostRecord``).
COST_FIELDS = (
    "flops",
    "flops_analytic",
    "flops_analytic_timed",
    "time_median_s",
    "time_iqr_s",
    "tokens_per_s",
    "peak_memory_bytes",
    "memory_measure",
    "decision_flops",
    "counting_overhead",
    "conditions",
)


def _plain(value: Any) -> Any:
    """Tuples as lists, as a JSON line reads back."""
    return list(value) if isinstance(value, tuple) else value


#: What the clock, the allocator or the machine decides: left out when two runs' records are compared.
MEASURED_BY_THE_CLOCK = frozenset(
    {
        "time_median_s",
        "time_iqr_s",
        "tokens_per_s",
        "peak_memory_bytes",
        "wall_ratio_interleaved",
        "wall_ratio_pairs",
        "wall_ratio_interval",
        "counting_overhead",
        "seconds",
    }
)
#: Relative tolerance within which the default run's records agree between two vector ISAs (same
#: commit and lock; ``tools/same-records --across-cpus``): the largest drift measured between AVX512 and
#: AVX2 was 0.117 (padding waste; exit ratios 0.050, PPL 0.0017), with margin (docs/design.md).
CROSS_CPU_TOLERANCE = 0.15
#: How a rule's training or risk control ran (epochs, p-values): discrete or astronomically small, so
#: across CPUs they are shown in the drift, not compared (the measures they lead to are).
ACROSS_CPUS_UNCOMPARED = frozenset({"rule_training", "risk_control"})
#: Of ``conditions``, what must be equal for two runs to be the same experiment.
SAME_EXPERIMENT_CONDITIONS = ("config", "training_key", "seed", "split")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: Integers that say what was measured, not how it came out: equal in every mode (a different cut or
#: another number of scored tokens is another experiment, not drift).
STRUCTURAL_FIELDS = frozenset({"tokens", "layers_per_stage", "stages", "num_stages", "epochs", "batch_shapes"})


def _same(a: Any, b: Any, rel: float, counts: bool = False) -> bool:
    """Equal, floats within ``rel``; with ``counts``, integers (token counts, FLOPs) within ``rel`` too."""
    if isinstance(a, float) and isinstance(b, float) or (counts and _number(a) and _number(b)):
        nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        return nan or math.isclose(a, b, rel_tol=rel, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, rel, counts) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (a.keys() | b.keys()) - MEASURED_BY_THE_CLOCK
        return all(k in a and k in b and _same(a[k], b[k], rel, counts) for k in keys)
    return a == b


def _drift(a: Any, b: Any) -> float:
    """The largest relative difference between the numbers of ``a`` and ``b`` (0 where they agree
    exactly, inf where they cannot be compared as numbers: different shapes, text, a missing value)."""
    if _number(a) and _number(b):
        if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            return 0.0
        if not (math.isfinite(a) and math.isfinite(b)):  # inf against a number, NaN against one
            return math.inf
        return abs(a - b) / max(abs(a), abs(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return max((_drift(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return max((_drift(a[k], b[k]) for k in a.keys() - MEASURED_BY_THE_CLOCK), default=0.0)
    return 0.0 if a == b else math.inf


def _by_point(records: Sequence[Record]) -> dict[str, dict]:
    return {r.point_id: r.as_dict() for r in records}


def field_drift(before: Sequence[Record], after: Sequence[Record]) -> dict[str, float]:
    """Per record field compared by ``record_differences``, the largest relative difference over the
    points both runs hold: how far two runs of one experiment on different CPUs drift, field by field."""
    first, second = _by_point(before), _by_point(after)
    drift: dict[str, float] = {}
    for point in (p for p in first if p in second):
        a, b = first[point], second[point]
        for key in (set(a) | set(b)) - MEASURED_BY_THE_CLOCK - {"conditions", "schema_version"}:
            drift[key] = max(drift.get(key, 0.0), _drift(a.get(key), b.get(key)))
    return dict(sorted(drift.items(), key=lambda item: -item[1]))


#: Config keys that change where a run writes, how much memory it spends or how its tables are typeset,
#: never what it measures: left out when two runs' configs are compared (and when a run resumes).
RESULT_NEUTRAL_KEYS = frozenset({"out", "reuse_memory_mb", "latex_intervals"})


def measured_config(value):
    """A config without the keys that do not change what it measures (``RESULT_NEUTRAL_KEYS``)."""
    return {k: v for k, v in value.items() if k not in RESULT_NEUTRAL_KEYS} if isinstance(value, dict) else value


def record_differences(
    before: Sequence[Record], after: Sequence[Record], rel: float = 0.0, counts: bool = False
) -> list[str]:
    """Every field in which two runs' records differ, point by point (empty: the same records).

    Compared: every field but ``MEASURED_BY_THE_CLOCK`` (at any depth: a rule's training time too),
    and of the conditions the config (without its output folder), the training key, the seed and
    the split; a field one side lacks counts as null. ``rel``: relative tolerance for floats (0:
    bit-equal); ``counts``: integers (tokens per stage, FLOPs) within ``rel`` too, as runs on
    different CPUs need (their thresholds differ in the last digits, so a few tokens exit elsewhere),
    and ``ACROSS_CPUS_UNCOMPARED`` left out."""
    first, second = _by_point(before), _by_point(after)
    found = [f"{p}: only in the first run" for p in first if p not in second]
    found += [f"{p}: only in the second run" for p in second if p not in first]
    for point in (p for p in first if p in second):
        a, b = first[point], second[point]
        skipped = (
            MEASURED_BY_THE_CLOCK | {"conditions", "schema_version"} | (ACROSS_CPUS_UNCOMPARED if counts else set())
        )
        for key in sorted((set(a) | set(b)) - skipped):
            if not _same(a.get(key), b.get(key), rel, counts and key not in STRUCTURAL_FIELDS):
                found.append(f"{point}: {key} {a.get(key)!r} != {b.get(key)!r}")
        for key in SAME_EXPERIMENT_CONDITIONS:
            x, y = (measured_config((r.get("conditions") or {}).get(key)) for r in (a, b))
            if isinstance(x, dict) and isinstance(y, dict):
                keys = sorted(k for k in x.keys() | y.keys() if not _same(x.get(k), y.get(k), rel))
                found += [f"{point}: conditions.{key}.{k} {x.get(k)!r} != {y.get(k)!r}" for k in keys]
            elif not _same(x, y, rel):
                found.append(f"{point}: conditions.{key} {x!r} != {y!r}")
    return found
