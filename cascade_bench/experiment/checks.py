"""Plausibility checks on stored results (docs/design.md section 4: "the report flags what is
implausible"). Pure functions over the records of one run: each check says whether it raised a
flag and gives the figures behind it. Flags are findings to explain, not failures.

- a later stage that makes the cascade worse than its own prefix;
- hard tokens (those that continue past stage 0) worse after the later stages than at stage 0;
- the dense model worse than the cascade's stage 0 alone (a deeper model worse than a shallower
  one trained the same way);
- training that stopped at the epoch cap (or ran partial epochs) instead of by early stopping;
- perplexity outside the plausible range (below the floor usually means leakage or a broken
  causal mask; above the ceiling, under-training);
- routed and masked early exit taking different stage-0 decisions at the same thresholds;
- counted FLOPs that differ from the analytic count where both exist;
- a risk-controlled point whose realised risk on the scored split exceeds its delta (allowed with
  probability epsilon; a finding to explain, not a bug by itself).

Checks of the sweep read the routed points of the run's own exit rule (``main_routed``); the other
rules' points (``exit_rules``) are reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from .records import Method, Record

#: Default plausible perplexity range for the corpora this toolkit ships with (see module docstring).
PLAUSIBLE_PPL = (5.0, 1000.0)


#: Each check is named by what passing means; a flagged one says what it suggests doing.
PREFIXES = "each later stage improves on the prefix before it"
HARD_TOKENS = "hard tokens improve after the later stages"
DENSE = "the dense model beats stage 0 alone"
TRAINING = "every trained part stopped by early stopping on whole epochs"
ROUTED_VS_MASKED = "routed and masked early exit make the same stage-0 decisions"
FLOP_COUNTS = "counted FLOPs equal the analytic count"
RISK_CONTROL = "every risk-controlled point within its delta on the scored split"

#: What a flag of each check suggests doing.
ADVICE = {
    PREFIXES: "the later stage does not help: for a cascade trained here, train it longer or on more text (see how "
    "its training stopped); for a pretrained model cut into blocks, check the model itself (its PPL) and the cut",
    HARD_TOKENS: "the later stages do not help the tokens routed to them: for a cascade trained here, train them on "
    "hard tokens (protocols ashem, cascade); for a pretrained model, cut it later or sweep lower hard ratios",
    DENSE: "a deeper model worse than a shallower one trained the same way: the dense baseline is under-trained "
    "or overfits; raise max_epochs or dense_patience and rerun",
    TRAINING: "raise the cap of the part that reached it (max_epochs for the stages and the dense model; drop "
    "max_steps_per_epoch) and rerun: figures from a model that did not converge do not compare",
    ROUTED_VS_MASKED: "both passes read the same stage-0 states, so this is a routing bug: report it with this "
    "run's records",
    FLOP_COUNTS: "an operation one count misses or counts twice: compare the per-operation counts of "
    "`cascade-bench cost`",
    RISK_CONTROL: "allowed with probability epsilon; if it recurs across seeds, calibrate on more batches "
    "(risk_batches)",
}


@dataclass(frozen=True)
class Check:
    """One check over a run's records, named by what passing means: ``flagged`` when it did not
    pass; ``detail`` gives the figures either way (or why it does not apply); ``advice`` what a
    flag suggests doing."""

    name: str
    flagged: bool
    detail: str
    advice: str = ""

    def __post_init__(self):
        if self.flagged and not self.advice:
            object.__setattr__(self, "advice", ADVICE.get(self.name, ""))


def _ppl(value) -> str:
    return f"{value:,.1f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def point_of(records: Sequence[Record], method: Method, **fields) -> Optional[Record]:
    """The first record of ``method`` whose fields equal ``fields`` (None if there is none): points
    are paired by what they measured, never by rebuilding their ids."""
    return next((r for r in records if r.method == method and all(getattr(r, k) == v for k, v in fields.items())), None)


def stored_config(records: Sequence[Record], key: str, default=None):
    """``key`` of the config the run stored with its records (the first record that has it), else
    ``default``."""
    for record in records:
        value = ((record.conditions or {}).get("config") or {}).get(key)
        if value:
            return value
    return default


def main_rule(records: Sequence[Record]) -> str:
    """The exit rule the run trained with (``exit_rule`` of its stored config; max_prob if absent)."""
    return stored_config(records, "exit_rule", "max_prob")


def is_main_rule(record: Record, rule: str) -> bool:
    """A record of the run's own exit rule (records from before exit rules were recorded count as it)."""
    return record.exit_rule in (None, rule)


def main_routed(records: Sequence[Record]) -> list[Record]:
    """The routed points of the run's own exit rule."""
    rule = main_rule(records)
    return [r for r in records if r.method == Method.ROUTED and is_main_rule(r, rule)]


def _training(records: Sequence[Record]) -> Optional[dict]:
    for record in records:
        training = (record.conditions or {}).get("training")
        if isinstance(training, dict):
            return training
    return None


def _difference_from_full(record: Record) -> Optional[list]:
    """The record's paired interval of PPL - full depth's PPL (None when it has none)."""
    found = ((record.intervals or {}).get("difference_from_full") or {}).get("ppl")
    return found["interval"] if isinstance(found, dict) else None


def check_prefixes(records: Sequence[Record]) -> Check:
    """Each later stage must make the cascade better than the prefix before it. The full cascade is
    better than a prefix only where the paired interval of their PPL difference lies above 0; a chain
    link between two prefixes (no paired interval between them) compares the PPLs themselves."""
    full = point_of(records, Method.FULL)
    prefixes = sorted((r for r in records if r.method == Method.PREFIX), key=lambda r: r.stages)
    if full is None or not prefixes:
        return Check(PREFIXES, False, "n/a: no full and prefix points")
    chain = [(f"stages 0..{r.stages - 1}" if r.stages > 1 else "stage 0 alone", r.ppl) for r in prefixes]
    chain.append(("full cascade", full.ppl))
    worse = [f"{b} PPL {_ppl(pb)} > {a} {_ppl(pa)}" for (a, pa), (b, pb) in zip(chain, chain[1:-1]) if pb > pa]
    last, (name, value) = prefixes[-1], chain[-2]
    interval = _difference_from_full(last)
    if interval is None:
        if full.ppl > value:
            worse.append(f"full cascade PPL {_ppl(full.ppl)} > {name} {_ppl(value)}")
        shown = " -> ".join(f"{n} {_ppl(v)}" for n, v in chain)
    else:
        low, high = interval
        if not low > 0:
            verdict = "worse" if high < 0 else "not distinguishable"
            worse.append(
                f"full cascade PPL {_ppl(full.ppl)} vs {name} {_ppl(value)}: {verdict} (paired interval of "
                f"{name} - full [{low:+.3g}, {high:+.3g}])"
            )
        shown = " -> ".join(f"{n} {_ppl(v)}" for n, v in chain) + f" ({name} - full [{low:+.3g}, {high:+.3g}])"
    if worse:
        return Check(PREFIXES, True, "; ".join(worse))
    return Check(PREFIXES, False, shown)


def check_hard_tokens(records: Sequence[Record]) -> Check:
    """Hard-token PPL after the later stages vs at stage 0, at every swept hard ratio."""
    routed = sorted(main_routed(records), key=lambda r: r.hard_ratio)
    pairs = [(r.hard_ratio, r.hard_ppl_stage0, r.hard_ppl) for r in routed]
    pairs = [
        (h, before, after)
        for h, before, after in pairs
        if isinstance(before, (int, float)) and math.isfinite(before) and math.isfinite(after)
    ]
    if not pairs:
        return Check(
            HARD_TOKENS,
            False,
            "n/a: no routed point has stage-0 NLL for its hard tokens (a logit-free exit rule)",
        )
    worse = [(h, b, a) for h, b, a in pairs if a >= b]
    h, before, after = min(pairs, key=lambda p: abs(p[0] - 0.5))
    at_half = f"at hard ratio {h:g}: {_ppl(before)} at stage 0 -> {_ppl(after)} after ({after / before - 1:+.1%})"
    if worse:
        listed = ", ".join(f"{h:g} ({_ppl(b)} -> {_ppl(a)})" for h, b, a in worse)
        return Check(
            HARD_TOKENS,
            True,
            f"hard-token PPL did not improve at hard ratio {listed}; {at_half}",
        )
    return Check(HARD_TOKENS, False, f"improved at all {len(pairs)} hard ratios; {at_half}")


def check_dense(records: Sequence[Record]) -> Check:
    dense, prefix = point_of(records, Method.DENSE), point_of(records, Method.PREFIX, stages=1)
    if dense is None or prefix is None:
        return Check(DENSE, False, "n/a: no dense model in this run" if dense is None else "n/a: no stage-0 point")
    detail = f"dense, same depth PPL {_ppl(dense.ppl)} vs stage 0 alone {_ppl(prefix.ppl)}"
    paired = ((dense.intervals or {}).get("difference_from_stage0") or {}).get("ppl")
    if not isinstance(paired, dict):
        return Check(DENSE, dense.ppl > prefix.ppl, detail)
    low, high = paired["interval"]
    detail += f" (paired interval of dense - stage 0 [{low:+.3g}, {high:+.3g}])"
    if high < 0:  # better only where the interval says so
        return Check(DENSE, False, detail)
    return Check(DENSE, True, detail + ("" if low > 0 else ": not distinguishable"))


def _stops(records: Sequence[Record]) -> list[tuple[str, dict]]:
    stops = []
    training = _training(records)
    for stage in (training or {}).get("stages", []):
        if "stop_reason" in stage:
            stops.append((f"stage {stage['stage']}", stage))
    for key, name in (("joint", "all stages (joint)"), ("exit_heads", "exit heads")):
        if key in (training or {}):
            stops.append((name, training[key]))
    dense = point_of(records, Method.DENSE)
    dense_training = (dense.conditions or {}).get("dense_training") if dense is not None else None
    if isinstance(dense_training, dict):
        stops.append(("dense", dense_training))
    classifiers = {}
    for record in records:
        for part in record.rule_training or []:
            classifiers[(part["rule"], part["stage"])] = part
    stops += [(f"{rule} exit classifier of stage {stage}", part) for (rule, stage), part in sorted(classifiers.items())]
    return stops


def check_training_stops(records: Sequence[Record]) -> Check:
    """Every trained part must stop by early stopping on whole epochs."""
    stops = _stops(records)
    if not stops:
        return Check(TRAINING, False, "n/a: nothing was trained in this run")
    cut = [
        f"{name} stopped at the epoch cap ({s['epochs']} of {s['max_epochs']} epochs, best epoch {s['best_epoch']})"
        for name, s in stops
        if s["stop_reason"] != "early stopping"
    ]
    cut += [
        f"{name} ran partial epochs (max_steps_per_epoch {s['max_steps_per_epoch']})"
        for name, s in stops
        if s.get("max_steps_per_epoch")
    ]
    summary = "; ".join(
        f"{name}: {s['epochs']} epochs, best {s['best_epoch']}, {s['stop_reason']}" for name, s in stops
    )
    return Check(TRAINING, bool(cut), "; ".join(cut) if cut else summary)


def check_ppl_range(records: Sequence[Record], plausible: Sequence[float] = PLAUSIBLE_PPL) -> Check:
    low, high = plausible
    outside = [
        f"{r.point_id} {_ppl(r.ppl)}" for r in records if isinstance(r.ppl, (int, float)) and not low <= r.ppl <= high
    ]
    name = f"every PPL within [{low:g}, {high:g}]"
    if outside:
        return Check(
            name,
            True,
            ", ".join(outside),
            f"below {low:g}: look for text shared between splits or a broken causal mask; above {high:g}: "
            "under-training, or a tokenizer that does not match the model; for another corpus set plausible_ppl",
        )
    values = [r.ppl for r in records if isinstance(r.ppl, (int, float))]
    return Check(
        name,
        False,
        f"all {len(values)} points between {_ppl(min(values))} and {_ppl(max(values))}"
        if values
        else "n/a: no perplexities",
    )


def _stage0_exits(record: Record) -> Optional[int]:
    exited = record.tokens_exited or []
    return exited[0] if exited else None


def check_routed_vs_masked(records: Sequence[Record]) -> Check:
    """Stage 0 sees the same tokens in both methods, so its exits must be the same."""
    rule = main_rule(records)
    masked = [r for r in records if r.method == Method.MASKED and is_main_rule(r, rule)]
    pairs = [(r, next((m for m in masked if m.hard_ratio == r.hard_ratio), None)) for r in main_routed(records)]
    pairs = [(r, m) for r, m in pairs if m is not None]
    if not pairs:
        return Check(ROUTED_VS_MASKED, False, "n/a: no masked points")
    differ = [
        f"hard {r.hard_ratio:g}: routed {_stage0_exits(r)} vs masked {_stage0_exits(m)} tokens exit at stage 0"
        for r, m in pairs
        if _stage0_exits(r) != _stage0_exits(m)
    ]
    return Check(
        ROUTED_VS_MASKED,
        bool(differ),
        "; ".join(differ) if differ else f"identical at all {len(pairs)} hard ratios",
    )


def check_flop_counts(records: Sequence[Record]) -> Check:
    counted = [r for r in records if r.flops is not None and r.flops_analytic is not None]
    if not counted:
        return Check(FLOP_COUNTS, False, "n/a: no counted point")
    differ = [
        f"{r.point_id}: counted {r.flops:,} vs analytic {r.flops_analytic:,}"
        for r in counted
        if r.flops != r.flops_analytic
    ]
    return Check(
        FLOP_COUNTS,
        bool(differ),
        "; ".join(differ)
        if differ
        else f"equal at all {len(counted)} counted points ({', '.join(r.point_id for r in counted)})",
    )


def check_risk_control(records: Sequence[Record]) -> Check:
    """Each risk-controlled point's realised risk on the scored split against its delta. When risk
    control calibrated on the very batches the run scores (``risk_batches = 0`` with ``eval_split =
    "validation"``), the realised risk is no test of the guarantee, and the text says so."""
    name = RISK_CONTROL
    points = [r for r in records if r.method == Method.RISK_CONTROLLED and r.risk_control]
    if not points:
        return Check(name, False, "n/a: no risk-controlled points")
    parts, over = [], []
    for r in points:
        control = r.risk_control
        split = (r.conditions or {}).get("split", "test")
        reused = split == "validation" and str(control.get("calibration", "")).startswith("shared")
        where = f"on {split}" + (" (the batches it calibrated on: not an independent test)" if reused else "")
        text = (
            f"{r.exit_rule}: {control['risk']} {r.realised_risk:.3f} {where} "
            f"(delta {control['delta']:g}, epsilon {control['epsilon']:g}, hard ratio "
            f"{'none passed' if control['hard_ratio'] is None else format(control['hard_ratio'], 'g')})"
        )
        interval = (r.intervals or {}).get("realised_risk")
        if isinstance(interval, list):
            # over its delta only where the interval says so; within sampling error it is not
            text += f", interval [{interval[0]:.3f}, {interval[1]:.3f}]"
            is_over = interval[0] > control["delta"]
        else:
            is_over = r.realised_risk > control["delta"]
        parts.append(text)
        if is_over:
            over.append(text)
    return Check(name, bool(over), "; ".join(over or parts))


def run_checks(records: Sequence[Record], plausible_ppl: Sequence[float] = PLAUSIBLE_PPL) -> list[Check]:
    """Every check above over one run's records, in a fixed order."""
    if not records:
        raise ValueError("no records to check; run `cascade-bench run` first")
    return [
        check_prefixes(records),
        check_hard_tokens(records),
        check_dense(records),
        check_training_stops(records),
        check_ppl_range(records, plausible_ppl),
        check_routed_vs_masked(records),
        check_flop_counts(records),
        check_risk_control(records),
    ]


def _state(check: Check) -> str:
    if check.flagged:
        return "FLAG"
    return "n/a" if check.detail.startswith("n/a") else "ok"


def format_checks(checks: Sequence[Check]) -> str:
    """One line per check: ``[ok]`` (it passed), ``[n/a]`` (nothing to check in this run) or
    ``[FLAG]``, what passing means, the figures, and for a flag what it suggests doing."""
    return (
        "\n".join(
            f"- [{_state(c)}] {c.name}: {c.detail}" + (f"; suggests: {c.advice}" if c.flagged and c.advice else "")
            for c in checks
        )
        + "\n"
    )
