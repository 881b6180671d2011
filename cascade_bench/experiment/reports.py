"""Tables from the results store (pandas), written as Markdown, LaTeX (booktabs) and CSV, and
``<name>.report.md``. Reporting only formats records; every figure comes from the store.

- per-threshold table: routed and masked early exit at each hard ratio of the sweep;
- paper table: every method, with costs relative to the full cascade, and early exit compared at
  matched cost: PPL of each swept curve interpolated at the FLOP ratio of routed early exit at the
  hard ratio closest to 0.5 ("n/r" where a curve never reaches that cost);
- seed-protocol table laid out like the ASHEM report, with the seed's published figures beside
  ours when the config is the seed's (ASHEM on WikiText-2 with the leaky seed protocol).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from ..data.markdown import markdown_table
from ..data.storage import write_text_atomic
from .checks import format_checks, run_checks
from .config import ExperimentConfig
from .estimates import Estimate, difference, estimate, interval_note, verdict
from .frames import main_routed_frame, records_frame
from .records import Method, Record

#: ASHEM's published WikiText-2 figures (docs/design.md section 4).
ASHEM_SEED_FIGURES = {
    "stage-0 PPL": 986.43,
    "threshold": 0.1499,
    "hard tokens trained on": 32768,
    "hard sequences trained on": 256,
    "hard PPL before": 2763.69,
    "hard PPL after": 668.08,
    "overall PPL": 830.0,
    "stage-0 accuracy": 0.1603,
    "overall accuracy": 0.1577,
    "shallow exits": 0.704,
    "deep exits": 0.296,
    "layer cost": 0.6482,
    "stage-1 best epoch": 7,
    "stage-1 epochs run": 10,
}


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, Estimate):
        return _fmt_estimate(value, digits)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) >= 100:
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:,.{digits}f}"


def _fmt_signed(value: float, digits: int, signed: bool) -> str:
    text = _fmt(value, digits)
    return f"+{text}" if signed and isinstance(value, float) and value > 0 else text


def _near_symmetric(value: Estimate) -> bool:
    """Whether ``x \\pm h`` describes the interval fairly: its two sides within a quarter of its half-width."""
    below, above = value.value - value.low, value.high - value.value
    return below >= 0 and above >= 0 and abs(above - below) <= 0.25 * value.half_width


def _fmt_estimate(value: Estimate, digits: int = 3, latex: str = "") -> str:
    """The value, then its interval: ``[lo, hi]`` (Markdown, CSV-less views and ``latex="brackets"``) or
    ``\\pm h`` (``latex="pm"``: half the interval's width, which a BCa interval is only roughly)."""
    text = _fmt_signed(value.value, digits, value.signed)
    if not value.has_interval or text == "n/a":
        return text
    if latex == "pm" and not value.signed and _near_symmetric(value):
        # a difference keeps both ends (its verdict reads off them), and so does a skewed interval
        return f"{text} $\\pm$ {_fmt(value.half_width, digits)}"
    low, high = (_fmt_signed(v, digits, value.signed) for v in (value.low, value.high))
    return f"{text} [{low}, {high}]"


def to_markdown(frame: pd.DataFrame) -> str:
    """The frame as a Markdown table, each value formatted for reading (``_fmt``)."""
    return markdown_table(frame.columns, ([_fmt(v) for v in row.values] for _, row in frame.iterrows())) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("@", r"@")):
        text = text.replace(a, b)
    return text


def to_latex(frame: pd.DataFrame, caption: str, intervals: str = "pm") -> str:
    """A booktabs table (needs \\usepackage{booktabs}); ``intervals``: how a value with an interval is
    written ("pm" or "brackets", ``config_sections.LATEX_INTERVALS``)."""
    align = "l" + "r" * (len(frame.columns) - 1)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_latex_escape(caption)}}}",
        rf"\begin{{tabular}}{{{align}}}",
        r"\toprule",
        " & ".join(_latex_escape(str(c)) for c in frame.columns) + r" \\",
        r"\midrule",
    ]
    for _, row in frame.iterrows():
        cells = [
            _fmt_estimate(v, latex=intervals) if isinstance(v, Estimate) else _latex_escape(_fmt(v)) for v in row.values
        ]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with each column of ``Estimate`` cells as three numeric columns: the value (under the
    column's name), ``<name> low`` and ``<name> high``."""
    columns = {}
    for name in frame.columns:
        cells = list(frame[name])
        if any(isinstance(cell, Estimate) for cell in cells):
            parts = [cell if isinstance(cell, Estimate) else Estimate(_csv_number(cell)) for cell in cells]
            columns[name] = [p.value for p in parts]
            columns[f"{name} low"] = [p.low for p in parts]
            columns[f"{name} high"] = [p.high for p in parts]
        else:
            columns[name] = cells
    return pd.DataFrame(columns)


def _csv_number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def write_table(frame: pd.DataFrame, stem: Path, caption: str, latex_intervals: str = "pm") -> list[Path]:
    """The table as ``<stem>.md``, ``.tex`` (intervals written as ``latex_intervals`` says) and ``.csv``
    (every interval as two more columns)."""
    paths = [stem.parent / f"{stem.name}.{suffix}" for suffix in ("md", "tex", "csv")]
    write_text_atomic(paths[0], to_markdown(frame))
    write_text_atomic(paths[1], to_latex(frame, caption, latex_intervals))
    write_text_atomic(paths[2], to_csv_frame(frame).to_csv(index=False))
    return paths


def threshold_table(frame: pd.DataFrame) -> pd.DataFrame:
    swept = frame[frame.method.isin([Method.ROUTED, Method.MASKED]) & frame.main].sort_values(["method", "hard_ratio"])
    return pd.DataFrame(
        {
            "method": swept.method,
            "hard ratio": swept.hard_ratio,
            "threshold": swept.thresholds.map(lambda t: t[0]),
            "exit at stage 0": swept.exit_ratio_0,
            "PPL": _estimates(swept, "ppl"),
            "PPL - full": [difference(row, "ppl") for _, row in swept.iterrows()],
            "hard PPL": _estimates(swept, "hard_ppl"),
            "easy PPL": _estimates(swept, "easy_ppl"),
            "layer cost": swept.layer_cost,
            "FLOP ratio": swept.flop_ratio,
            "wall ratio": _estimates(swept, "wall_ratio"),
            "tokens/s": swept.tokens_per_s,
        }
    )


def _estimates(frame: pd.DataFrame, name: str) -> list[Estimate]:
    """Column ``name`` of ``frame`` with each row's interval (index kept aligned by position)."""
    return [estimate(row, name) for _, row in frame.iterrows()]


def wall_flops_table(frame: pd.DataFrame) -> Optional[pd.DataFrame]:
    """Routed early exit under the run's own rule at each swept hard ratio: the FLOP ratio and the
    wall ratio over the same (timed) batches and their difference, what early exit loses in wall
    time beyond its FLOPs; a last row gives the medians. None without timed FLOPs in the records."""
    routed = main_routed_frame(frame).sort_values("hard_ratio")
    routed = routed[routed.flop_ratio_timed.notna() & routed.wall_ratio.notna()]
    if routed.empty:
        return None
    gap = routed.wall_ratio - routed.flop_ratio_timed
    table = pd.DataFrame(
        {
            "hard ratio": routed.hard_ratio.map(lambda r: f"{r:g}"),
            "FLOP ratio (timed batches)": routed.flop_ratio_timed,
            "wall ratio": routed.wall_ratio,
            "wall - FLOP": gap,
        }
    )
    median = {
        "hard ratio": "median",
        "FLOP ratio (timed batches)": routed.flop_ratio_timed.median(),
        "wall ratio": routed.wall_ratio.median(),
        "wall - FLOP": gap.median(),
    }
    return pd.concat([table, pd.DataFrame([median])], ignore_index=True)


def _interpolate(curve: pd.DataFrame, cost: float) -> float:
    curve = curve.sort_values("flop_ratio")
    xs, ys = curve.flop_ratio.tolist(), curve.ppl.tolist()
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= cost <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (cost - x0) / (x1 - x0)
    return math.nan


def _nearest(part: pd.DataFrame, hard_ratio: float):
    return part.iloc[(part.hard_ratio - hard_ratio).abs().argsort().iloc[0]]


def _swept_curves(frame: pd.DataFrame) -> list[pd.DataFrame]:
    """Routed curves (the run's own rule first, then each other rule), then masked, each non-empty."""
    routed = frame[frame.method == Method.ROUTED]
    rules = list(dict.fromkeys([*routed[routed.main].exit_rule, *routed.exit_rule]))
    curves = [routed[routed.exit_rule == rule] for rule in rules]
    curves.append(frame[(frame.method == Method.MASKED) & frame.main])
    return [curve for curve in curves if not curve.empty]


def paper_table(frame: pd.DataFrame, match_hard_ratio: float = 0.5) -> tuple[pd.DataFrame, Optional[float]]:
    """Every method with its own cost, plus each swept curve (routed per exit rule, masked) at its
    point nearest ``match_hard_ratio`` and interpolated at the matched FLOP ratio: that of routed
    early exit with the run's own rule at that hard ratio."""
    routed = main_routed_frame(frame)
    target = float(_nearest(routed, match_hard_ratio).flop_ratio) if not routed.empty else None
    rows = []
    for method in (Method.FULL, Method.PREFIX, Method.DENSE):
        rows += [_paper_row(row, math.nan) for _, row in frame[frame.method == method].iterrows()]
    for curve in _swept_curves(frame):
        matched = _interpolate(curve, target) if target is not None else math.nan
        rows.append(_paper_row(_nearest(curve, match_hard_ratio), matched))
    rows += [
        _paper_row(row, math.nan)
        for _, row in frame[frame.method.isin([Method.RISK_CONTROLLED, Method.ORACLE])].iterrows()
    ]
    return pd.DataFrame(rows), target


def _paper_row(row, matched: float) -> dict:
    change = difference(row, "ppl")
    return {
        "method": row.label,
        "PPL": estimate(row, "ppl"),
        "PPL - full": change,
        "vs full": verdict(change),
        "accuracy": estimate(row, "accuracy") if row.accuracy is not None else math.nan,
        "exit at stage 0": row.exit_ratio_0,
        "layer cost": row.layer_cost,
        "FLOP ratio": row.flop_ratio,
        "decision share of FLOPs": row.decision_share,
        "wall ratio": estimate(row, "wall_ratio"),
        **realisation(row),
        "PPL at matched FLOPs": matched,
    }


def realisation(row) -> dict:
    """How much of the theoretical saving the measured wall time realises: the measured speedup
    (1 / wall ratio) over the speedup the FLOPs of the timed batches predict (1 / their FLOP ratio),
    and over the ideal from layers used (1 / layer cost). 1 = all of it; below 1, overheads (gathers,
    small batches, the exit decision) eat into it; n/a without a wall ratio or for the full cascade."""
    wall, layers = float(row.wall_ratio), float(row.layer_cost)
    flops = float(row.get("flop_ratio_timed", math.nan))
    if row.method in (Method.FULL, Method.ORACLE) or not math.isfinite(wall) or wall <= 0:
        return {"realised / FLOP-predicted": math.nan, "realised / layer ideal": math.nan}
    return {"realised / FLOP-predicted": flops / wall, "realised / layer ideal": layers / wall}


#: FLOP budgets (fractions of the full cascade's) at which the rules table compares the exit rules.
RULE_BUDGETS = (0.8, 0.9)


def rules_table(frame: pd.DataFrame, match_hard_ratio: float = 0.5) -> pd.DataFrame:
    """One row per exit rule: its routed point nearest ``match_hard_ratio`` (PPL, costs, the decision's
    own share of the FLOPs, agreement with exact max_prob where it approximates it) and its PPL
    interpolated at fixed FLOP budgets (n/a where its curve does not reach one)."""
    rows = []
    for curve in _swept_curves(frame):
        if curve.method.iloc[0] != Method.ROUTED:
            continue
        point = _nearest(curve, match_hard_ratio)
        agreement = point.get("agreement_with_max_prob", math.nan)
        change = difference(point, "ppl")
        row = {
            "exit rule": point.exit_rule + (" (trained with)" if point.main else ""),
            "hard ratio": point.hard_ratio,
            "PPL": estimate(point, "ppl"),
            "PPL - full": change,
            "vs full": verdict(change),
            "layer cost": point.layer_cost,
            "FLOP ratio": point.flop_ratio,
            "decision share of FLOPs": point.decision_share,
            "wall ratio": estimate(point, "wall_ratio"),
            **realisation(point),
            "agreement with max_prob": agreement if isinstance(agreement, float) else math.nan,
        }
        row.update({f"PPL @ {b:g}x FLOPs": _interpolate(curve, b) for b in RULE_BUDGETS})
        rows.append(row)
    return pd.DataFrame(rows)


def kv_table(frame: pd.DataFrame) -> Optional[pd.DataFrame]:
    """One row per K/V policy for exited tokens, at the same thresholds: what later stages' caches
    held, its PPL and costs, and the extra work (tokens recomputed, K/V propagated)."""
    points = frame[frame.method == Method.KV_ROUTED]
    if points.empty:
        return None
    return pd.DataFrame(
        {
            "K/V policy": points.kv_policy,
            "hard ratio": points.hard_ratio,
            "PPL": _estimates(points, "ppl"),
            "exit at stage 0": points.exit_ratio_0,
            "layer cost": points.layer_cost,
            "FLOP ratio": points.flop_ratio,
            "wall ratio": _estimates(points, "wall_ratio"),
            "recomputed tokens": [sum(c) - sum(e) for c, e in zip(points.tokens_computed, points.tokens_entered)],
            "propagated K/V (token x stage)": points.tokens_propagated.map(sum),
        }
    )


def _risk_calibration(frame: pd.DataFrame) -> str:
    """What the risk-controlled points calibrated on, as their records say."""
    notes = {
        point.risk_control.get("calibration", "the validation batches (not recorded which)")
        for _, point in frame[frame.method == Method.RISK_CONTROLLED].iterrows()
    }
    return "; ".join(sorted(notes))


def risk_table(frame: pd.DataFrame) -> Optional[pd.DataFrame]:
    """Risk-controlled points: what was bounded, the level, the point chosen, its bound on the
    calibration split's testing half and the realised risk on the scored split."""
    points = frame[frame.method == Method.RISK_CONTROLLED]
    if points.empty:
        return None
    rows = []
    for _, point in points.iterrows():
        control = point.risk_control
        rows.append(
            {
                "exit rule": point.exit_rule,
                "risk": control["risk"],
                "delta": control["delta"],
                "epsilon": control["epsilon"],
                "hard ratio chosen": control["hard_ratio"] if control["hard_ratio"] is not None else "none",
                "calibration risk": control["empirical_risk"],
                "upper bound (1-eps)": control["upper_bound"],
                "realised risk": estimate(point, "realised_risk"),
                "PPL": estimate(point, "ppl"),
                "FLOP ratio": point.flop_ratio,
                "wall ratio": estimate(point, "wall_ratio"),
            }
        )
    return pd.DataFrame(rows)


def seed_table(frame: pd.DataFrame, config) -> tuple[pd.DataFrame, bool]:
    """ASHEM-style table for the routed point nearest hard ratio 0.5 and stage 1's training; seed figures
    beside it when the config reproduces the seed (ASHEM protocol, WikiText-2, leaky seed protocol). The
    seed's own variant is sequence-level hard examples and a frozen exit head (``hard_examples``,
    ``exit_head``); its accuracies are given in the order it lists them (16.03%, 15.77%)."""
    routed = main_routed_frame(frame)
    prefix = frame[(frame.method == Method.PREFIX) & (frame.get("stages", 1) == 1)] if "stages" in frame else frame[:0]
    if routed.empty:
        raise ValueError("the results have no routed point for the seed-protocol table")
    point = routed.iloc[(routed.hard_ratio - 0.5).abs().argsort().iloc[0]]
    training = next(
        (c["training"] for c in frame.get("conditions", []) if isinstance(c, dict) and c.get("training")), {}
    )
    stage1 = next((s for s in training.get("stages", []) if s.get("stage") == 1), {})
    ours = {
        "stage-0 PPL": prefix.ppl.iloc[0] if not prefix.empty else math.nan,
        "threshold": point.thresholds[0],
        "hard tokens trained on": stage1.get("hard_tokens_trained_on", math.nan),
        "hard sequences trained on": stage1.get("hard_sequences", math.nan),
        "mean confidence (all sequences)": stage1.get("mean_confidence", math.nan),
        "mean confidence (hard sequences)": stage1.get("hard_mean_confidence", math.nan),
        "hard tokens": point.hard_tokens,
        "hard PPL before": point.hard_ppl_stage0,
        "hard PPL after": point.hard_ppl,
        "overall PPL": point.ppl,
        "stage-0 accuracy": prefix.accuracy.iloc[0] if not prefix.empty else math.nan,
        "overall accuracy": point.accuracy,
        "shallow exits": point.exit_ratios[0],
        "deep exits": 1 - point.exit_ratios[0],
        "layer cost": point.layer_cost,
        "FLOP ratio": point.flop_ratio,
        "wall ratio": point.wall_ratio,
        "stage-1 trainable parameters": stage1.get("trainable_parameters", math.nan),
        "parameters (all stages)": stage1.get("parameters", math.nan),
        "stage-1 best epoch": stage1.get("best_epoch", math.nan),
        "stage-1 epochs run": stage1.get("epochs", math.nan),
    }
    is_seed = config.protocol == "ashem" and config.leaky_seed_protocol and "wikitext" in str(config.corpus).lower()
    table = pd.DataFrame({"quantity": list(ours), "this run": list(ours.values())})
    if is_seed:
        table["ASHEM seed (published)"] = [ASHEM_SEED_FIGURES.get(k, math.nan) for k in ours]
    return table, is_seed


def training_table(records: Sequence[Record]) -> Optional[pd.DataFrame]:
    """Per trained part (each stage, the exit heads, the dense baseline): epochs run, best epoch, how it
    stopped. None when nothing was trained (blocks of a pretrained model with shared heads)."""
    training, dense = None, None
    for record in records:
        conditions = record.conditions or {}
        training = training or conditions.get("training")
        dense = dense or conditions.get("dense_training")
    parts = [(f"stage {s['stage']}", s) for s in (training or {}).get("stages", []) if "stop_reason" in s]
    for key, name in (("joint", "all stages (joint)"), ("exit_heads", "exit heads")):
        if (training or {}).get(key):
            parts.append((name, training[key]))
    if dense:
        parts.append(("dense, same depth", dense))
    if not parts:
        return None
    return pd.DataFrame(
        [
            {
                "trained": name,
                "layers": part.get("layers", math.nan),
                "lr": part.get("lr", math.nan),
                "trained on (tokens)": part.get("hard_tokens_trained_on", math.nan),
                "epochs": part["epochs"],
                "best epoch": part["best_epoch"],
                "best validation PPL": part["best_val_ppl"],
                "stopped by": part["stop_reason"],
                "epoch cap": part["max_epochs"],
                "patience": part["patience"],
                "trainable / all parameters": (
                    f"{part['trainable_parameters']:,} / {part['parameters']:,}" if part.get("parameters") else "n/a"
                ),
                "seconds": part.get("seconds", math.nan),
            }
            for name, part in parts
        ]
    )


def epoch_log_lines(records: Sequence[Record]) -> list[str]:
    """Per later stage, its validation PPL and the PPL of the tokens past stage 0 ("hard PPL") after
    every epoch: the seeds' "Val PPL | Hard PPL" log."""
    training = next((r.conditions["training"] for r in records if (r.conditions or {}).get("training")), {})
    lines = []
    for part in training.get("stages", []):
        logged = part.get("val_logged") or []
        if any("hard PPL" in entry for entry in logged):
            epochs = "; ".join(
                f"{i + 1}: {ppl:.2f} | {entry.get('hard PPL', math.nan):.2f}"
                for i, (ppl, entry) in enumerate(zip(part["val_ppl"], logged))
            )
            lines.append(f"- stage {part['stage']}, per epoch (validation PPL | hard PPL): {epochs}")
    return (
        [
            "",
            "Validation after every epoch (hard PPL: the tokens that continued past stage 0, as the seeds log it):",
            "",
            *lines,
        ]
        if lines
        else []
    )


def _rule_training_lines(records: Sequence[Record]) -> list[str]:
    trained = {}
    for record in records:
        for part in record.rule_training or []:
            trained[(part["rule"], part["stage"])] = part
    if not trained:
        return []
    table = pd.DataFrame(
        [
            {
                "exit rule": rule,
                "stage": stage,
                "target": part["target"],
                "epochs": part["epochs"],
                "best epoch": part["best_epoch"],
                "best validation BCE": part["best_validation_bce"],
                "stopped by": part["stop_reason"],
                "seconds": part["seconds"],
            }
            for (rule, stage), part in sorted(trained.items())
        ]
    )
    return [
        "",
        "Learned exit classifiers (trained on the train split with the cascade frozen, early stopping on "
        "the validation BCE):",
        "",
        to_markdown(table),
    ]


def _risk_lines(risks: pd.DataFrame, calibration: str) -> list[str]:
    return [
        "## Risk-controlled thresholds",
        "",
        "Thresholds chosen by Learn-then-Test (fixed-sequence binomial tests over hard ratios 0.9, 0.8, ..., 0.1): "
        "candidates calibrated on the even batches of risk control's calibration batches, tested on the odd ones, "
        "so that with probability at least 1 - epsilon the routed pass's risk (disagreement: its prediction "
        "differs from the full cascade's; nll_increase: its NLL exceeds the full cascade's by more than the "
        f"tolerance) is at most delta. Calibration batches: {calibration}. "
        "Tokens are treated as independent draws, which tokens of one sequence are not: the guarantee is "
        "approximate in that respect. 'Upper bound' is the (1 - epsilon) Clopper-Pearson bound of the chosen "
        "point's risk on the testing half; where no hard ratio passed, nobody exits and the bound is exactly 0. "
        "'Realised risk' is measured on the scored split.",
        "",
        to_markdown(risks),
    ]


def _kv_lines(kv: pd.DataFrame, reference: str) -> list[str]:
    return [
        "## K/V policies for exited tokens",
        "",
        "The routed point at the same thresholds under each K/V policy: `absent` (a later stage never sees "
        "a token that exited before it), `propagate` (the exited token's state fills the later stages' caches, "
        "its K/V projections charged) and `recompute` (later stages run on the exited tokens once a later token "
        "of the sequence reaches them). All three use padded batching, so their costs compare with each other; "
        f"costs are relative to {reference}.",
        "",
        to_markdown(kv),
    ]


def _processes(records: Sequence[Record]) -> str:
    """How many processes evaluated the points (torchrun data-parallel runs record their ranks)."""
    counts = sorted({(r.conditions or {}).get("ranks") or 1 for r in records})
    if counts == [1]:
        return "1 process"
    if len(counts) == 1:
        return f"data-parallel over {counts[0]} processes (torchrun)"
    return f"points measured on {' and '.join(map(str, counts))} processes (a resumed sweep; see each record)"


def _exit_study_lines(paths: dict) -> list[str]:
    """The exit study's section (see ``experiment.exit_study``), when the run made one."""
    path = paths.get("exit_study")
    if path is None or not Path(path).is_file():
        return []
    summary = json.loads(Path(path).read_text())
    source = summary.get("source") or {}
    needed, heads = summary["layers_needed"], summary["translators"]
    lines = ["## Where could this model exit?", ""]
    if source:
        lines += [
            f"Weights: {source.get('gguf_file')} ({source.get('note')}; sha256 "
            f"{str(source.get('gguf_sha256'))[:12]}...{', from ' + source['distribution'] if 'distribution' in source else ''}).",  # noqa: E501
            "",
        ]
    lines += [
        f"The unsplit model on {summary['scored_tokens']:,} scored tokens: PPL {_fmt(summary['full_depth_ppl'])}. Per "
        f"candidate layer, the model's own final norm + lm_head (shared head) and a translator fitted for that layer "
        f"with the model frozen ({_translator_fit(heads)}). The scored split is not among the translators' tokens.",
        "",
        to_markdown(exit_curve_table(summary)),
        f"Layers a token needs for the full-depth prediction (oracle, out of {summary['num_layers']}): first "
        f"agreement {_fmt(needed['shared']['first_agreement'], 2)} and settled {_fmt(needed['shared']['settled'], 2)} "
        f"with the shared head ({needed['shared']['grid']}); first agreement "
        f"{_fmt(needed['trained']['first_agreement'], 2)} and settled {_fmt(needed['trained']['settled'], 2)} with "
        f"translators ({needed['trained']['grid']}). Trained translators beat the shared head at every candidate: "
        f"{'yes' if summary['trained_beats_shared_everywhere'] else 'NO'}.",
        "",
        f"![exit curve](plots/{Path(path).name.replace('.exit_study.json', '')}.exit_curve.png)",
        "",
    ]
    return lines


def _translator_fit(heads: dict) -> str:
    """How the exit study's translators were fitted, in one clause."""
    lstsq = heads.get("lstsq") or {}
    ridges = sorted({layer["ridge"] for layer in (lstsq.get("layers") or {}).values()})
    text = (
        f"{heads.get('parameters_per_layer', 0):,} parameters per layer; ridge least squares onto the last "
        f"layer's stream from {heads.get('train_tokens', 0):,} train-split tokens, ridge "
        f"{'/'.join(f'{r:g}' for r in ridges)} chosen on {heads.get('validation_tokens', 0):,} validation-split "
        f"tokens"
    )
    cross_entropy = heads.get("cross_entropy")
    if cross_entropy:
        text += (
            f", then cross-entropy training: {cross_entropy['epochs']} epochs, best {cross_entropy['best_epoch']}, "
            f"{cross_entropy['stop_reason']}"
        )
    text += f"; {_fmt(heads.get('seconds'))} s with the state collection"
    return text + (", reused from an earlier run" if heads.get("reused") else "")


def _file_list(tables: Sequence[Path], paths: dict, name: str) -> list[str]:
    """The files of run ``name``: the tables this report wrote, its records and the plots and study
    files present, as paths relative to the run's folder (another run's files are not listed)."""
    out = paths["report"].parent
    present = [
        paths["results"],
        paths["confidence"],
        paths["exit_study"],
        *sorted(paths["tables"].glob(f"{name}.exit_curve.*")),
        *sorted(paths["plots"].glob(f"{name}.*")),
    ]
    saved = [paths["models"] / "cascade", paths["translators"]]
    files = [
        *tables,
        *(path for path in present if path.is_file()),
        *(f"{path}/ (saved models)" for path in saved if Path(path).is_dir()),
        paths["report"],
    ]

    def relative(path) -> str:
        text = str(path)
        return text[len(str(out)) + 1 :] if text.startswith(f"{out}/") else text

    return [f"- `{relative(path)}`" for path in files]


@dataclass(frozen=True)
class _RunTables:
    """The tables of one run's report, each built once from its records' frame."""

    thresholds: pd.DataFrame
    paper: pd.DataFrame
    target: Optional[float]
    seed: pd.DataFrame
    is_seed: bool
    rules: pd.DataFrame
    kv: Optional[pd.DataFrame]
    risks: Optional[pd.DataFrame]
    wall_flops: Optional[pd.DataFrame]
    frame: pd.DataFrame


def _run_tables(frame: pd.DataFrame, config: ExperimentConfig) -> _RunTables:
    paper, target = paper_table(frame)
    seed, is_seed = seed_table(frame, config)
    return _RunTables(
        threshold_table(frame),
        paper,
        target,
        seed,
        is_seed,
        rules_table(frame),
        kv_table(frame),
        risk_table(frame),
        wall_flops_table(frame),
        frame,
    )


def _write_run_tables(t: _RunTables, config: ExperimentConfig, folder: Path, reference: str) -> list[Path]:
    """Every table of the report as Markdown, LaTeX and CSV in ``folder``, with its caption."""
    name, split = config.name, config.eval_split
    captions = [
        (t.thresholds, "thresholds", f"early exit per hard ratio ({split} split)"),
        (t.paper, "paper", f"methods compared (costs relative to {reference})"),
        (t.seed, "seed", "seed-protocol layout"),
        (t.rules, "rules", f"exit rules compared ({split} split)"),
        (t.kv, "kv", f"K/V policies for exited tokens ({split} split)"),
        (t.risks, "risk", f"risk-controlled thresholds ({split} split)"),
        (t.wall_flops, "wall_flops", f"wall time against FLOPs ({split} split)"),
    ]
    note = interval_note(t.frame, config.latex_intervals)
    written: list[Path] = []
    for table, stem, caption in captions:
        if table is not None:
            full_caption = f"{name}: {caption}" + (f"; {note}" if note else "")
            written += write_table(table, folder / f"{name}.{stem}", full_caption, config.latex_intervals)
    return written


def _opening_lines(records: Sequence[Record], config: ExperimentConfig) -> list[str]:
    """The title, what ran on what data with which install, and how it was measured."""
    name, split = config.name, config.eval_split
    first = records[0].conditions or {}
    training = first.get("training") or {}
    return [
        f"# {name}",
        "",
        f"Dataset {first.get('dataset')} ({', '.join(first.get('split_notes') or []) or 'its own splits'}), "
        f"tokenizer {first.get('tokenizer')} ({first.get('tokenizer_vocab')} ids), windows of {first.get('window')} "
        f"tokens, stride {first.get('stride')}, evaluated on the {split} split"
        + (
            " (the split whose hard tokens stage 1 trained on: the seeds' leaky report)"
            if split == "validation" and config.leaky_seed_protocol
            else ""
        )
        + ". "
        + (
            f"Model {config.model} cut into blocks before layers {training.get('boundaries', list(config.boundaries))} "
            f"({training.get('boundaries_chosen_by', 'config')}; {config.block_heads} exit heads)"
            if config.model
            else f"Protocol {training.get('protocol', config.protocol)}"
            f"{' (leaky seed protocol: hard tokens collected from validation and scored there)' if config.leaky_seed_protocol else ''}"  # noqa: E501
            f", preset {config.preset}: {training.get('grows', 'n/a')}"
        )
        + f". Exit rule {config.exit_rule}, "
        f"{config.device}/{config.dtype}, {config.threads} threads, {_processes(records)}, seed {config.seed}, "
        f"torch {first.get('torch')}, transformers {first.get('transformers')}, commit {first.get('git_commit')}.",
        "",
        f"How it was measured: {first.get('measured', 'n/a')}."
        + "".join(f" Not run: {point}, because {reason}." for point, reason in (first.get("not_run") or {}).items())
        + "".join(f" Adapted to the model: {note}." for note in first.get("adapted") or ())
        + (
            f" Warning before the sweep: {warning}."
            if (warning := (first.get("first_look") or {}).get("warning"))
            else ""
        ),
        "",
    ]


def _checks_and_training_lines(records: Sequence[Record], config: ExperimentConfig) -> list[str]:
    checks = run_checks(records, config.plausible_ppl)
    trained = training_table(records)
    return [
        "## Checks",
        "",
        "Flags are findings to explain, with the figures that raised them; none stops the run.",
        "",
        format_checks(checks),
        "## Training",
        "",
        (
            to_markdown(trained) + "\nEvery part trains with AdamW and stops after `patience` epochs without a new "
            "best validation PPL (the best state is restored); `epoch cap` is a safety limit, and a part that reaches "
            "it is flagged above."
            if trained is not None
            else "Nothing was trained in this run."
        ),
        *epoch_log_lines(records),
        "",
    ]


def _method_lines(t: _RunTables, reference: str) -> list[str]:
    """The methods compared (paper table) and the exit rules compared (rules table), with what they mean."""
    target, paper, rules = t.target, t.paper, t.rules
    return [
        "## Methods",
        "",
        f"Costs are relative to {reference}; wall ratios were timed back to back with it. "
        f"'PPL at matched FLOPs' interpolates each swept curve at "
        f"the FLOP ratio of routed early exit at the hard ratio nearest 0.5 ({_fmt(target)}); n/a where the "
        f"curve never reaches that cost. The oracle's cost is analytic and it has no wall time. "
        f"'PPL - full' is the paired difference from {reference} on the same windows; 'vs full' says "
        "whether its interval excludes 0 (better, worse) or not (not distinguishable). 'realised / "
        "FLOP-predicted' is the measured speedup (1 / wall ratio) over the one the timed batches' FLOPs "
        "predict, 'realised / layer ideal' over the one from layers used (1 / layer cost): 1 when the "
        "implementation realises the whole saving.",
        "",
        *([f"Intervals: {interval_note(t.frame)}.", ""] if interval_note(t.frame) else []),
        to_markdown(paper),
        "## Exit rules",
        "",
        f"Every exit rule on the same trained cascade, at its point nearest hard ratio 0.5 and at fixed FLOP "
        f"budgets (fractions of {reference}'s FLOPs; n/a where a curve does not reach one). 'Decision share' is "
        "the part of the point's FLOPs that the exit decisions computed and no token's prediction uses: the "
        "rule's own matmuls plus the exit-head logits of tokens that did not exit at that stage. Rules without "
        "logits (cos_sim, classifier, lowrank, topk) run a stage's lm_head only for the tokens that exit there. "
        "lowrank:R and topk:K approximate max_prob (logits from a rank-R factorisation of lm_head or from its K "
        "most frequent training ids); 'agreement with max_prob' is the fraction of scored tokens whose stage-0 "
        "decision is the same as exact max_prob's, each at its own calibrated threshold.",
        "",
        to_markdown(rules),
    ]


def write_report(records: Sequence[Record], config: ExperimentConfig, paths: dict) -> Path:
    """Write the run's tables (md/tex/csv) and ``<name>.report.md``, which lists every file of the
    run; return the report's path."""
    frame = records_frame(records)
    name = config.name
    reference = "the unsplit model" if config.model else "the full cascade"
    t = _run_tables(frame, config)
    written = _write_run_tables(t, config, paths["tables"], reference)
    lines = [
        *_opening_lines(records, config),
        *_checks_and_training_lines(records, config),
        *_method_lines(t, reference),
        *_rule_training_lines(records),
        *(_kv_lines(t.kv, reference) if t.kv is not None else []),
        *(_risk_lines(t.risks, _risk_calibration(frame)) if t.risks is not None else []),
        *_exit_study_lines(paths),
        "## Sweep",
        "",
        to_markdown(t.thresholds),
        *(_wall_flops_lines(t.wall_flops, reference) if t.wall_flops is not None else []),
        "## Seed-protocol layout",
        "",
        (
            "Seed figures beside ours: this config reproduces the seed."
            if t.is_seed
            else "This config is not the seed's (ASHEM, WikiText-2, leaky seed protocol), so the seed's published "
            "figures are not shown beside it."
        ),
        "",
        to_markdown(t.seed),
        "## Plots",
        "",
        f"![cost vs PPL](plots/{name}.cost_vs_ppl.png)",
        "",
        f"![exit ratios](plots/{name}.exit_ratios.png)",
        "",
        f"![confidences](plots/{name}.confidence.png)",
        "",
        f"Tables as LaTeX (booktabs) and CSV beside the Markdown in `results/`; records in `results/{name}.jsonl`.",
        "",
        "## Files of this run",
        "",
        *_file_list(written, paths, name),
    ]
    write_text_atomic(paths["report"], "\n".join(lines) + "\n")
    return paths["report"]


def _wall_flops_lines(table: pd.DataFrame, reference: str) -> list[str]:
    return [
        "## Wall time against FLOPs",
        "",
        f"Routed early exit under the run's own rule, against {reference} on the timed batches alone: the "
        "FLOP ratio of those batches (the FLOP ratio above covers every scored batch), the wall ratio "
        "(timed back to back on them) and the difference, the wall time a routed pass spends beyond its "
        "FLOPs (stage calls' fixed costs, the exit heads' softmax, gathering and scattering).",
        "",
        to_markdown(table),
    ]


def _ppl_text(value: float) -> str:
    """A PPL for the table: 3 decimals, or 3 significant digits once it is astronomically large."""
    return "n/a" if value is None or math.isnan(value) else (f"{value:.3g}" if value >= 1e5 else f"{value:,.3f}")


def exit_curve_table(summary: dict) -> pd.DataFrame:
    """One row per candidate layer: shared vs trained PPL and agreement (a pandas DataFrame)."""
    rows = [
        {
            "exit after layer": str(r["layer"]),
            "PPL, shared head": _ppl_text(r["shared_ppl"]),
            "PPL, translator": _ppl_text(r["trained_ppl"]),
            "agreement, shared head": r["shared_agreement"],
            "agreement, translator": r["trained_agreement"],
        }
        for r in summary["candidate_rows"]
    ]
    rows.append(
        {
            "exit after layer": f"{summary['num_layers']} (full depth)",
            "PPL, shared head": _ppl_text(summary["full_depth_ppl"]),
            "PPL, translator": "n/a",
            "agreement, shared head": 1.0,
            "agreement, translator": math.nan,
        }
    )
    return pd.DataFrame(rows)
