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

COLORS = {
    "routed": "tab:blue",
    "masked": "tab:orange",
    "full": "black",
    "prefix": "tab:gray",
    "dense": "tab:green",
    "oracle": "tab:red",
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


def _pyplot():
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


def _save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"]
    for path in paths:
        tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
        fig.savefig(tmp, dpi=150, bbox_inches="tight")
        tmp.replace(path)
    return paths


def plot_cost_vs_ppl(frame, stem: Path) -> list[Path]:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, (column, xlabel) in zip(axes, PANELS):
        for method in ("routed", "masked"):
            curve = frame[(frame.method == method) & frame.main].sort_values("hard_ratio")
            curve = curve[curve[column].notna()]
            if curve.empty:
                continue
            rule = f" ({curve.exit_rule.iloc[0]})" if method == "routed" else ""
            ax.plot(curve[column], curve.ppl, "o-", color=COLORS[method], label=f"{method} early exit{rule}")
            if method == "routed":
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
        others = frame[(frame.method == "routed") & ~frame.main & frame[column].notna()]
        for color, rule in zip(RULE_COLORS, dict.fromkeys(others.exit_rule)):
            curve = others[others.exit_rule == rule].sort_values("hard_ratio")
            ax.plot(curve[column], curve.ppl, "^--", color=color, label=f"routed early exit ({rule})")
        kv = frame[(frame.method == "kv_routed") & frame[column].notna()] if "kv_policy" in frame else None
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
        for method, marker in (("full", "s"), ("prefix", "v"), ("dense", "D"), ("oracle", "*")):
            part = frame[(frame.method == method) & frame[column].notna()]
            if not part.empty:
                ax.scatter(
                    part[column],
                    part.ppl,
                    marker=marker,
                    s=90,
                    color=COLORS[method],
                    zorder=3,
                    label={
                        "full": part.label.iloc[0],  # "full cascade" or "unsplit model"
                        "prefix": "prefix alone",
                        "dense": "dense, same depth",
                        "oracle": "oracle bound",
                    }[method],
                )
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test perplexity")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, frameon=False, bbox_to_anchor=(0.5, 1.08))
    paths = _save(fig, stem)
    plt.close(fig)
    return paths


def plot_exit_ratios(frame, stem: Path) -> list[Path]:
    plt = _pyplot()
    routed = frame[(frame.method == "routed") & frame.main].sort_values("hard_ratio")
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
    paths = _save(fig, stem)
    plt.close(fig)
    return paths


def plot_confidences(histograms: dict, frame, stem: Path) -> list[Path]:
    plt = _pyplot()
    stages = histograms["histograms"]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(6 * max(1, len(stages)), 4), squeeze=False)
    routed = frame[(frame.method == "routed") & frame.main].sort_values("hard_ratio")
    for ax, hist in zip(axes[0], stages):
        counts = hist["counts"]
        width = (hist["max"] - hist["min"]) / len(counts) or 1e-6
        edges = [hist["min"] + i * width for i in range(len(counts))]
        ax.bar(edges, counts, width=width, align="edge", color="tab:blue", alpha=0.7)
        for _, row in routed.iterrows():
            threshold = row.thresholds[hist["stage"]]
            ax.axvline(threshold, color="tab:red", alpha=0.5, linewidth=1)
            ax.text(threshold, max(counts) * 0.95, f"{row.hard_ratio:g}", rotation=90, fontsize=7, color="tab:red")
        ax.set_xlabel(f"stage {hist['stage']} confidence ({hist['exit_fn']})")
        ax.set_ylabel("test tokens")
        ax.set_title("calibrated thresholds (red) labelled by hard ratio", fontsize=9)
    paths = _save(fig, stem)
    plt.close(fig)
    return paths


def make_plots(records: Sequence[dict], confidence_path: Path, plots_dir: Path, name: str) -> list[Path]:
    from .reports import records_frame

    frame = records_frame(records)
    paths = plot_cost_vs_ppl(frame, plots_dir / f"{name}.cost_vs_ppl")
    paths += plot_exit_ratios(frame, plots_dir / f"{name}.exit_ratios")
    if Path(confidence_path).exists():
        paths += plot_confidences(
            json.loads(Path(confidence_path).read_text()), frame, plots_dir / f"{name}.confidence"
        )
    return paths
