"""Figures from the results store (matplotlib, Agg), saved as PNG and PDF:

- cost vs PPL: three panels (layer cost, FLOPs: counted where measured, else the analytic count
  that equals it, and wall time, each relative to the full cascade), one curve per swept method and
  per exit rule, baselines as points, the K/V-policy points, the oracle bound (no wall time),
  the Pareto front of routed early exit circled;
- stacked exit ratios per hard ratio of the sweep;
- confidence histograms per stage with the calibrated thresholds of the sweep.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..data.renamed_keys import read_renamed
from .estimates import estimate, interval_note
from .frames import records_frame
from .records import Method, Record

COLORS = {
    Method.ROUTED: "tab:blue",
    Method.MASKED: "tab:orange",
    Method.FULL: "black",
    Method.PREFIX: "tab:gray",
    Method.DENSE: "tab:green",
    Method.ORACLE: "tab:red",
}
#: Colours of the routed curves of the other exit rules, in the order of ``exit_rules``.
RULE_COLORS = ("tab:purple", "tab:cyan", "tab:olive", "tab:brown", "tab:pink", "goldenrod")
#: Markers of the K/V-policy points (one routed operating point under each policy).
KV_MARKERS = ("x", "P", "X")
PANELS = (
    ("layer_cost", "layer cost (fraction of all layers x tokens)"),
    ("flop_ratio", "FLOPs / full depth (counted = analytic)"),
    ("wall_ratio", "wall time / full depth"),
)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (cost, ppl), both lower is better."""
    front = []
    for i, (c, p) in enumerate(points):
        if not any((c2 <= c and p2 <= p) and (c2 < c or p2 < p) for j, (c2, p2) in enumerate(points) if j != i):
            front.append(i)
    return front


def save_figure(fig, stem: Path) -> list[Path]:
    """``fig`` as ``<stem>.png`` and ``<stem>.pdf``, each written atomically; their paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"]
    for path in paths:
        tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
        fig.savefig(tmp, dpi=150, bbox_inches="tight")
        tmp.replace(path)
    return paths


def _interval_ends(part, name: str) -> tuple[list, list]:
    """Per row of ``part``, the low and high ends of its interval of ``name`` (NaN where it has none)."""
    lows, highs = [], []
    for _, row in part.iterrows():
        found = estimate(row, name)
        lows.append(found.low)
        highs.append(found.high)
    return lows, highs


def _error_bars(ax, part, column: str, color) -> None:
    """The points' PPL intervals as vertical bars (and, on the wall-ratio panel, the wall ratio's
    interval as horizontal ones); points without an interval get none."""
    import numpy as np

    lows, highs = _interval_ends(part, "ppl")
    ppl = part.ppl.astype(float).to_numpy()
    yerr = np.array([ppl - np.array(lows), np.array(highs) - ppl])
    xerr = None
    if column == "wall_ratio":
        left, right = _interval_ends(part, "wall_ratio")
        x = part[column].astype(float).to_numpy()
        xerr = np.nan_to_num(np.array([x - np.array(left), np.array(right) - x]), nan=0.0)
    if np.isfinite(yerr).any() or (xerr is not None and xerr.any()):
        # a bar never goes negative: where an interval's end crosses its value (rare with BCa) it stops there
        yerr = np.clip(np.nan_to_num(yerr, nan=0.0), 0.0, None)
        xerr = None if xerr is None else np.clip(xerr, 0.0, None)
        ax.errorbar(part[column], ppl, yerr=yerr, xerr=xerr, fmt="none", ecolor=color, alpha=0.5, capsize=2)


def _draw_cost_panel(ax, frame, column: str) -> None:
    """One panel of the cost-vs-PPL figure: PPL against ``column`` for the swept curves (the routed
    curve's Pareto front ringed), the other exit rules, the K/V policies and the baselines."""
    for method in (Method.ROUTED, Method.MASKED):
        curve = frame[(frame.method == method) & frame.main].sort_values("hard_ratio")
        curve = curve[curve[column].notna()]
        if curve.empty:
            continue
        rule = f" ({curve.exit_rule.iloc[0]})" if method == Method.ROUTED else ""
        ax.plot(curve[column], curve.ppl, "o-", color=COLORS[method], label=f"{method} early exit{rule}")
        _error_bars(ax, curve, column, COLORS[method])
        if method == Method.ROUTED:
            front = pareto_front(list(zip(curve[column], curve.ppl)))
            ax.scatter(
                curve[column].iloc[front],
                curve.ppl.iloc[front],
                s=160,
                facecolors="none",
                edgecolors=COLORS[method],
                linewidths=1.5,
                label="Pareto front (routed)",
            )
    others = frame[(frame.method == Method.ROUTED) & ~frame.main & frame[column].notna()]
    for color, rule in zip(RULE_COLORS, dict.fromkeys(others.exit_rule)):
        curve = others[others.exit_rule == rule].sort_values("hard_ratio")
        ax.plot(curve[column], curve.ppl, "^--", color=color, label=f"routed early exit ({rule})")
        _error_bars(ax, curve, column, color)
    kv = frame[(frame.method == Method.KV_ROUTED) & frame[column].notna()] if "kv_policy" in frame else None
    for policy, marker in zip(kv.kv_policy if kv is not None else (), KV_MARKERS):
        point = kv[kv.kv_policy == policy]
        ax.scatter(
            point[column],
            point.ppl,
            marker=marker,
            s=70,
            color="tab:blue",
            zorder=3,
            label=f"K/V {policy} (padded, hard {point.hard_ratio.iloc[0]:g})",
        )
    for method, marker in ((Method.FULL, "s"), (Method.PREFIX, "v"), (Method.DENSE, "D"), (Method.ORACLE, "*")):
        part = frame[(frame.method == method) & frame[column].notna()]
        if not part.empty:
            _error_bars(ax, part, column, COLORS[method])
            ax.scatter(
                part[column],
                part.ppl,
                marker=marker,
                s=90,
                color=COLORS[method],
                zorder=3,
                label={
                    Method.FULL: part.label.iloc[0],  # "full cascade" or "unsplit model"
                    Method.PREFIX: "prefix alone",
                    Method.DENSE: "dense, same depth",
                    Method.ORACLE: "oracle bound",
                }[method],
            )


def plot_cost_vs_ppl(frame, stem: Path) -> list[Path]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, (column, xlabel) in zip(axes, PANELS):
        _draw_cost_panel(ax, frame, column)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test perplexity")
    note = interval_note(frame)
    if note:
        shown = note.split(", paired")[0].replace("[lo, hi]: ", "")
        text = (
            f"bars: each point's own PPL interval ({shown}; the paired differences from full depth are in the "
            "tables); horizontal, on the wall panel: the wall ratio's interval over its 3 back-to-back pairs (75%)"
        )
        fig.text(0.5, -0.04, text, ha="center", fontsize=7, wrap=True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, frameon=False, bbox_to_anchor=(0.5, 1.08))
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def plot_exit_ratios(frame, stem: Path) -> list[Path]:
    plt = pyplot()
    routed = frame[(frame.method == Method.ROUTED) & frame.main].sort_values("hard_ratio")
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(routed)
    labels = [f"{r:g}" for r in routed.hard_ratio]
    stages = len(routed.exit_ratios.iloc[0]) if len(routed) else 0
    for k in range(stages):
        values = [ratios[k] for ratios in routed.exit_ratios]
        ax.bar(labels, values, bottom=bottom, label=f"exit at stage {k}")
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("hard ratio (fraction calibrated to continue past each stage, validation)")
    ax.set_ylabel("fraction of test tokens")
    ax.set_ylim(0, 1)
    ax.legend()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def plot_confidences(histograms: dict, frame, stem: Path) -> list[Path]:
    plt = pyplot()
    stages = histograms["histograms"]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(6 * max(1, len(stages)), 4), squeeze=False)
    routed = frame[(frame.method == Method.ROUTED) & frame.main].sort_values("hard_ratio")
    for ax, hist in zip(axes[0], stages):
        counts = hist["counts"]
        width = (hist["max"] - hist["min"]) / len(counts) or 1e-6
        edges = [hist["min"] + i * width for i in range(len(counts))]
        ax.bar(edges, counts, width=width, align="edge", color="tab:blue", alpha=0.7)
        for _, row in routed.iterrows():
            threshold = row.thresholds[hist["stage"]]
            ax.axvline(threshold, color="tab:red", alpha=0.5, linewidth=1)
            ax.text(threshold, max(counts) * 0.95, f"{row.hard_ratio:g}", rotation=90, fontsize=7, color="tab:red")
        ax.set_xlabel(f"stage {hist['stage']} confidence ({hist['exit_rule']})")
        ax.set_ylabel("test tokens")
        ax.set_title("calibrated thresholds (red) labelled by hard ratio", fontsize=9)
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def make_plots(records: Sequence[Record], confidence_path: Path, plots_dir: Path, name: str) -> list[Path]:
    """The run's plots (cost vs PPL, exit ratios, stage-0 confidences) from its records."""
    frame = records_frame(records)
    paths = plot_cost_vs_ppl(frame, plots_dir / f"{name}.cost_vs_ppl")
    paths += plot_exit_ratios(frame, plots_dir / f"{name}.exit_ratios")
    if Path(confidence_path).exists():
        paths += plot_confidences(_read_confidences(Path(confidence_path)), frame, plots_dir / f"{name}.confidence")
    return paths


def _read_confidences(path: Path) -> dict:
    """The stored confidence histograms; one written before a key's rename is read under the new name."""
    stored = json.loads(path.read_text())
    stored["histograms"] = [read_renamed(hist, str(path)) for hist in stored.get("histograms", [])]
    return stored


def plot_exit_curve(summary: dict, stem: Path) -> list[Path]:
    """PPL (log) and agreement per layer: the shared head at every layer, translators at the candidates."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    shared = summary["shared_curve"]
    rows = summary["candidate_rows"]
    left.semilogy(
        [p["layer"] for p in shared],
        [p["ppl"] for p in shared],
        "o-",
        color="tab:gray",
        ms=3,
        label="shared norm + lm_head",
    )
    left.semilogy(
        [r["layer"] for r in rows], [r["trained_ppl"] for r in rows], "s-", color="tab:blue", label="trained translator"
    )
    left.axhline(summary["full_depth_ppl"], color="black", ls="--", lw=1, label="full depth")
    left.set_xlabel("exit after layer")
    left.set_ylabel("PPL (log scale)")
    left.legend()
    right.plot(
        [p["layer"] for p in shared],
        [p["agreement"] for p in shared],
        "o-",
        color="tab:gray",
        ms=3,
        label="shared norm + lm_head",
    )
    right.plot(
        [r["layer"] for r in rows],
        [r["trained_agreement"] for r in rows],
        "s-",
        color="tab:blue",
        label="trained translator",
    )
    right.set_xlabel("exit after layer")
    right.set_ylabel("top-1 agreement with full depth")
    right.set_ylim(0, 1)
    right.legend()
    # whole layers on the x-axis, one layer of margin: a single candidate reads as a labelled point at its
    # layer, not a line on a 0.96-1.04 axis
    from matplotlib.ticker import MaxNLocator

    layers = [p["layer"] for p in shared] + [r["layer"] for r in rows]
    for axis, key in ((left, "trained_ppl"), (right, "trained_agreement")):
        axis.set_xlim(min(layers) - 1, max(layers) + 1)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(rows) <= 3:
            for r in rows:
                axis.annotate(
                    f"layer {r['layer']}", (r["layer"], r[key]), textcoords="offset points", xytext=(6, 6), fontsize=8
                )
    fig.suptitle(f"{summary['model']}: where could it exit? ({summary['scored_tokens']:,} scored tokens)")
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths
