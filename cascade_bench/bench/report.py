"""Tables and a cost-vs-time plot from a pytest-benchmark JSON file (``--benchmark-json``).

Each benchmark of ``benchmarks/test_routing_speed.py`` becomes one row: its group (batch shape
and hard ratio), method, median and IQR wall time, and from ``extra_info`` the counted FLOPs,
FLOP ratio, layer cost, exit ratios, PPL. Wall ratios are against the full-cascade benchmark of
the same batch shape in the same file (sequential medians, so machine drift enters them) and, where
recorded, the interleaved ratio each benchmark measured back to back against the full cascade;
``wall/FLOP`` is the bar the issues set (<= 1.05 on CPU, <= 1.10 on GPU). Tables are written
with the same writers as ``cascade-bench report``. The block benchmarks
(``test_block_speed.py``) compare against the unsplit model, not the full cascade, and are left
out here: ``cascade-bench bench-blocks`` tabulates that comparison from one interleaved run.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pandas as pd

from ..experiment.plots import COLORS, pyplot, save_figure
from ..experiment.reports import write_table

_NAME = re.compile(r"test_(?P<kind>\w+)\[(?P<params>[^\]]*)\]")


def _hard_ratio(params: dict, path) -> "float | None":
    """A benchmark's hard ratio; one recorded before the rename as the forced ``exit_ratio`` (the share
    that left after stage 0) is read as 1 - it, with a note."""
    if "exit_ratio" in params and "hard_ratio" not in params:
        warnings.warn(
            f"{path}: benchmarks recorded with the parameter 'exit_ratio' (before the rename); read as "
            f"hard_ratio = 1 - exit_ratio. Run the benchmarks again to record 'hard_ratio'.",
            FutureWarning,
            stacklevel=3,
        )
        return None if params["exit_ratio"] is None else 1.0 - float(params["exit_ratio"])
    return params.get("hard_ratio")


def benchmark_frame(path: "Path | str") -> pd.DataFrame:
    """One row per routing benchmark with a ``flop_ratio`` in its extra_info."""
    payload = json.loads(Path(path).read_text())
    rows = []
    for bench in payload.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "flop_ratio" not in info:
            continue
        params = bench.get("params") or {}
        method = params.get("method") or params.get("baseline")
        if method is None:
            continue
        rows.append(
            {
                "shape": "x".join(map(str, info.get("batch_shape", []))),
                "method": method,
                "hard ratio": _hard_ratio(params, path),
                "median ms": bench["stats"]["median"] * 1e3,
                "IQR ms": bench["stats"]["iqr"] * 1e3,
                "rounds": bench["stats"]["rounds"],
                "FLOP ratio": info["flop_ratio"],
                "layer cost": info["layer_cost"],
                "exit at stage 0": info["exit_ratios"][0],
                "PPL": info["ppl"],
                "tokens": info["tokens"],
                "device": info.get("device"),
                "dtype": info.get("dtype"),
                "wall ratio (interleaved)": info.get("wall_ratio_interleaved", float("nan")),
            }
        )
    if not rows:
        raise ValueError(
            f"{path} has no routing benchmarks with extra_info (run pytest benchmarks/ "
            f"--benchmark-only --benchmark-json FILE; block benchmarks: cascade-bench bench-blocks)"
        )
    frame = pd.DataFrame(rows)
    full = frame[frame.method == "full"].set_index("shape")["median ms"]
    frame["wall ratio"] = frame.apply(lambda r: r["median ms"] / full.get(r["shape"], float("nan")), axis=1)
    frame["wall/FLOP"] = frame["wall ratio"] / frame["FLOP ratio"]
    frame["interleaved wall/FLOP"] = frame["wall ratio (interleaved)"] / frame["FLOP ratio"]
    return frame.sort_values(["shape", "hard ratio", "method"], na_position="first").reset_index(drop=True)


def plot_cost_vs_time(frame: pd.DataFrame, stem: Path) -> list[Path]:
    """Wall ratio against FLOP ratio, one marker per method, with the wall = FLOP line."""
    plt = pyplot()
    shapes = sorted(frame["shape"].unique())
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    interleaved = frame["wall ratio (interleaved)"].notna().any()
    y = "wall ratio (interleaved)" if interleaved else "wall ratio"
    for ax, shape in zip(axes[0], shapes):
        part = frame[(frame["shape"] == shape) & frame[y].notna()]
        for method, group in part.groupby("method"):
            color = COLORS.get(method.split("-")[0], "tab:purple")
            marker = "o" if method.endswith("padded") else "s" if method.endswith("bucketed") else "^"
            ax.scatter(group["FLOP ratio"], group[y], color=color, marker=marker, label=method)
        low = min(part["FLOP ratio"].min(), part[y].min()) * 0.95
        high = max(part["FLOP ratio"].max(), part[y].max()) * 1.05
        ax.plot([low, high], [low, high], "k--", linewidth=1, label="wall ratio = FLOP ratio")
        ax.set_xlabel("counted FLOPs / full cascade")
        ax.set_ylabel("wall time / full cascade" + (" (timed back to back)" if interleaved else ""))
        ax.set_title(f"batch {shape}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def write_bench_report(path: "Path | str", out_dir: "Path | str") -> list[Path]:
    """Tables (md/tex/csv) and the cost-vs-time plot for a benchmark JSON file."""
    frame = benchmark_frame(path)
    out = Path(out_dir)
    stem = Path(path).stem
    paths = write_table(frame, out / f"{stem}.benchmarks", f"benchmarks from {Path(path).name}")
    paths += plot_cost_vs_time(frame, out / f"{stem}.cost_vs_time")
    return paths
