"""Tables from the results store (pandas), written as Markdown, LaTeX (booktabs) and CSV, and
``report.md``. Reporting only formats records; every figure comes from the store.

- per-threshold table: routed and masked early exit at each hard ratio of the sweep;
- paper table: every method, with costs relative to the full cascade, and early exit compared at
  matched cost: PPL of each swept curve interpolated at the FLOP ratio of routed early exit at the
  hard ratio closest to 0.5 ("n/r" where a curve never reaches that cost);
- seed-protocol table laid out like the ASHEM report, with the seed's published figures beside
  ours when the config is the seed's (ASHEM on WikiText-2 with the leaky seed protocol).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from ..data.storage import write_text_atomic
from .checks import format_checks, run_checks

#: ASHEM's published WikiText-2 figures (DESIGN.md section 4).
ASHEM_SEED_FIGURES = {"stage-0 PPL": 986.43, "hard PPL before": 2763.69, "hard PPL after": 668.08,
                      "overall PPL": 830.0, "shallow exits": 0.704, "layer cost": 0.6482}


def records_frame(records: Sequence[dict]) -> pd.DataFrame:
    """One row per point, with costs relative to the full cascade (layer_cost, flop_ratio, wall_ratio)."""
    if not records:
        raise ValueError("no results to report; run `cascade-bench run` first")
    frame = pd.DataFrame(records)
    full = frame[frame.method == "full"]
    if full.empty:
        raise ValueError("the results have no 'full' point; relative costs need the full-cascade baseline")
    full = full.iloc[0]
    # Layer cost relative to the full cascade's depth (a prefix of 2 of 4 layers costs 0.5).
    full_layers = sum(full.layers_per_stage)
    frame["layer_cost"] = frame.layer_cost * frame.layers_per_stage.map(sum) / full_layers
    frame["exit_ratio_0"] = frame.exit_ratios.map(lambda r: r[0] if isinstance(r, list) and r else math.nan)
    flops = frame.flops.where(frame.flops.notna(), frame.flops_analytic).astype(float)
    frame["flop_ratio"] = flops / float(full.flops)
    # Wall ratio: the back-to-back ratio each point measured against the full cascade where it
    # has one (drift between points stays out), else the ratio of medians timed apart.
    apart = frame.time_median_s.astype(float) / float(full.time_median_s)
    if "wall_ratio_interleaved" in frame:
        frame["wall_ratio"] = frame.wall_ratio_interleaved.astype(float).where(
            frame.wall_ratio_interleaved.notna(), apart)
        frame.loc[frame.method == "full", "wall_ratio"] = 1.0
    else:
        frame["wall_ratio"] = apart
    frame["label"] = frame.apply(_label, axis=1)
    return frame


def _pretrained_model(row) -> Optional[str]:
    """The checkpoint a record's blocks were cut from (None for a trained cascade)."""
    conditions = row.get("conditions")
    training = conditions.get("training") if isinstance(conditions, dict) else None
    return training.get("model") if isinstance(training, dict) else None


def _label(row) -> str:
    blocks = _pretrained_model(row) is not None
    part = "block" if blocks else "stage"
    if row.method == "prefix":
        stages = int(row.get("stages", 1))
        return f"{part} 0 alone" if stages == 1 else f"{part}s 0..{stages - 1} alone"
    if row.method in ("routed", "masked"):
        return f"{row.method} EE @ hard {row.hard_ratio:g}"
    if row.method == "full" and blocks:
        return "unsplit model"
    return {"full": "full cascade", "dense": "dense, same depth", "oracle": "oracle bound"}.get(row.method, row.method)


def _fmt(value, digits: int = 3) -> str:
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


def to_markdown(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "|".join([" --- "] * len(frame.columns)) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(v) for v in row.values) + " |")
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("@", r"@")):
        text = text.replace(a, b)
    return text


def to_latex(frame: pd.DataFrame, caption: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    align = "l" + "r" * (len(frame.columns) - 1)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex_escape(caption)}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(_latex_escape(str(c)) for c in frame.columns) + r" \\", r"\midrule"]
    for _, row in frame.iterrows():
        lines.append(" & ".join(_latex_escape(_fmt(v)) for v in row.values) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(frame: pd.DataFrame, stem: Path, caption: str) -> list[Path]:
    paths = [stem.parent / f"{stem.name}.{suffix}" for suffix in ("md", "tex", "csv")]
    write_text_atomic(paths[0], to_markdown(frame))
    write_text_atomic(paths[1], to_latex(frame, caption))
    write_text_atomic(paths[2], frame.to_csv(index=False))
    return paths


def threshold_table(frame: pd.DataFrame) -> pd.DataFrame:
    swept = frame[frame.method.isin(["routed", "masked"])].sort_values(["method", "hard_ratio"])
    return pd.DataFrame({
        "method": swept.method, "hard ratio": swept.hard_ratio, "threshold": swept.thresholds.map(lambda t: t[0]),
        "exit at stage 0": swept.exit_ratio_0, "PPL": swept.ppl, "hard PPL": swept.hard_ppl,
        "easy PPL": swept.easy_ppl, "layer cost": swept.layer_cost, "FLOP ratio": swept.flop_ratio,
        "wall ratio": swept.wall_ratio, "tokens/s": swept.tokens_per_s})


def _interpolate(curve: pd.DataFrame, cost: float) -> float:
    curve = curve.sort_values("flop_ratio")
    xs, ys = curve.flop_ratio.tolist(), curve.ppl.tolist()
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= cost <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (cost - x0) / (x1 - x0)
    return math.nan


def paper_table(frame: pd.DataFrame, match_hard_ratio: float = 0.5) -> tuple[pd.DataFrame, Optional[float]]:
    """Every method with its own cost, plus the swept curves at the matched FLOP ratio."""
    routed = frame[frame.method == "routed"]
    target = None
    if not routed.empty:
        anchor = routed.iloc[(routed.hard_ratio - match_hard_ratio).abs().argsort().iloc[0]]
        target = float(anchor.flop_ratio)
    rows = []
    order = ["full", "prefix", "dense", "routed", "masked", "oracle"]
    for method in order:
        part = frame[frame.method == method]
        if part.empty:
            continue
        if method in ("routed", "masked"):
            chosen = part.iloc[(part.hard_ratio - match_hard_ratio).abs().argsort().iloc[0]]
            matched = _interpolate(part, target) if target is not None else math.nan
            rows.append(_paper_row(chosen, matched))
        else:
            for _, row in part.iterrows():
                rows.append(_paper_row(row, math.nan))
    return pd.DataFrame(rows), target


def _paper_row(row, matched: float) -> dict:
    return {"method": row.label, "PPL": row.ppl, "accuracy": row.accuracy if row.accuracy is not None else math.nan,
            "exit at stage 0": row.exit_ratio_0, "layer cost": row.layer_cost, "FLOP ratio": row.flop_ratio,
            "wall ratio": row.wall_ratio, "PPL at matched FLOPs": matched}


def seed_table(frame: pd.DataFrame, config) -> tuple[pd.DataFrame, bool]:
    """ASHEM-style table for the routed point nearest hard ratio 0.5; seed figures beside it when
    the config reproduces the seed (ASHEM protocol, WikiText-2, leaky seed protocol)."""
    routed = frame[frame.method == "routed"]
    prefix = frame[(frame.method == "prefix") & (frame.get("stages", 1) == 1)] if "stages" in frame else frame[:0]
    if routed.empty:
        raise ValueError("the results have no routed point for the seed-protocol table")
    point = routed.iloc[(routed.hard_ratio - 0.5).abs().argsort().iloc[0]]
    ours = {"stage-0 PPL": prefix.ppl.iloc[0] if not prefix.empty else math.nan,
            "threshold": point.thresholds[0], "hard tokens": point.hard_tokens,
            "hard PPL before": point.hard_ppl_stage0, "hard PPL after": point.hard_ppl, "overall PPL": point.ppl,
            "shallow exits": point.exit_ratios[0], "deep exits": 1 - point.exit_ratios[0],
            "layer cost": point.layer_cost, "FLOP ratio": point.flop_ratio, "wall ratio": point.wall_ratio}
    is_seed = (config.protocol == "ashem" and config.leaky_seed_protocol and "wikitext" in str(config.corpus).lower())
    table = pd.DataFrame({"quantity": list(ours), "this run": list(ours.values())})
    if is_seed:
        table["ASHEM seed (published)"] = [ASHEM_SEED_FIGURES.get(k, math.nan) for k in ours]
    return table, is_seed


def training_table(records: Sequence[dict]) -> Optional[pd.DataFrame]:
    """Per trained part (each stage, the exit heads, the dense baseline): epochs run, best epoch, how it
    stopped. None when nothing was trained (blocks of a pretrained model with shared heads)."""
    training, dense = None, None
    for record in records:
        conditions = record.get("conditions") or {}
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
    return pd.DataFrame([{
        "trained": name, "layers": part.get("layers", math.nan), "lr": part.get("lr", math.nan),
        "trained on (tokens)": part.get("hard_tokens_trained_on", math.nan), "epochs": part["epochs"],
        "best epoch": part["best_epoch"], "best validation PPL": part["best_val_ppl"],
        "stopped by": part["stop_reason"], "epoch cap": part["max_epochs"], "patience": part["patience"],
        "seconds": part.get("seconds", math.nan)} for name, part in parts])


def write_report(records: Sequence[dict], config, paths: dict) -> Path:
    """Write the three tables (md/tex/csv) and report.md; return report.md's path."""
    frame = records_frame(records)
    tables = paths["tables"]
    name = config.name
    reference = "the unsplit model" if getattr(config, "model", "") else "the full cascade"
    thresholds = threshold_table(frame)
    paper, target = paper_table(frame)
    seed, is_seed = seed_table(frame, config)
    split = getattr(config, "eval_split", "test")
    write_table(thresholds, tables / f"{name}.thresholds", f"{name}: early exit per hard ratio ({split} split)")
    write_table(paper, tables / f"{name}.paper", f"{name}: methods compared (costs relative to {reference})")
    write_table(seed, tables / f"{name}.seed", f"{name}: seed-protocol layout")
    first = records[0].get("conditions", {})
    training = first.get("training") or {}
    trained = training_table(records)
    checks = run_checks(records, getattr(config, "plausible_ppl", (5.0, 1000.0)))
    lines = [
        f"# {name}", "",
        f"Dataset {first.get('dataset')} ({', '.join(first.get('split_notes') or []) or 'its own splits'}), "
        f"tokenizer {first.get('tokenizer')} ({first.get('tokenizer_vocab')} ids), windows of {first.get('window')} "
        f"tokens, stride {first.get('stride')}, evaluated on the {split} split"
        + (" (the split whose hard tokens stage 1 trained on: the seeds' leaky report)"
           if split == "validation" and config.leaky_seed_protocol else "") + ". " + (
            f"Model {config.model} cut into blocks before layers {list(config.boundaries)} "
            f"({config.block_heads} exit heads)" if config.model else
            f"Protocol {training.get('protocol', config.protocol)}"
            f"{' (leaky seed protocol: hard tokens collected from validation and scored there)' if config.leaky_seed_protocol else ''}"
            f", preset {config.preset}: {training.get('grows', 'n/a')}")
        + f". Exit rule {config.exit_fn}, "
        f"{config.device}/{config.dtype}, {config.threads} threads, seed {config.seed}, "
        f"torch {first.get('torch')}, transformers {first.get('transformers')}, commit {first.get('git_commit')}.",
        "", f"How it was measured: {first.get('measured', 'n/a')}.",
        "", "## Checks", "",
        "Flags are findings to explain, with the figures that raised them; none stops the run.", "",
        format_checks(checks),
        "## Training", "",
        (to_markdown(trained) + "\nEvery part trains with AdamW and stops after `patience` epochs without a new "
         "best validation PPL (the best state is restored); `epoch cap` is a safety limit, and a part that reaches "
         "it is flagged above." if trained is not None else "Nothing was trained in this run."), "",
        "## Methods", "",
        f"Costs are relative to {reference}; wall ratios were timed back to back with it. "
        f"'PPL at matched FLOPs' interpolates each swept curve at "
        f"the FLOP ratio of routed early exit at the hard ratio nearest 0.5 ({_fmt(target)}); n/a where the "
        f"curve never reaches that cost. The oracle's cost is analytic and it has no wall time.", "",
        to_markdown(paper), "## Sweep", "", to_markdown(thresholds),
        "## Seed-protocol layout", "",
        ("Seed figures beside ours: this config reproduces the seed." if is_seed else
         "This config is not the seed's (ASHEM, WikiText-2, leaky seed protocol), so the seed's published "
         "figures are not shown beside it."), "", to_markdown(seed),
        "## Plots", "",
        f"![cost vs PPL](plots/{name}.cost_vs_ppl.png)", "",
        f"![exit ratios](plots/{name}.exit_ratios.png)", "",
        f"![confidences](plots/{name}.confidence.png)", "",
        f"Tables as LaTeX (booktabs) and CSV beside the Markdown in `results/`; records in `results/{name}.jsonl`.",
    ]
    write_text_atomic(paths["report"], "\n".join(lines) + "\n")
    return paths["report"]
