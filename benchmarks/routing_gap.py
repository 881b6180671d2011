"""Wall time against FLOPs of a run's routed early exit, on the cascade the run trained: at every
swept hard ratio, the analytic FLOP ratio and the wall ratio over the same timed batches, and where
the routed pass spends the difference.

    cascade-bench run                                        # first: trains and saves the cascade
    python benchmarks/routing_gap.py                         # the default run, in this folder
    python benchmarks/routing_gap.py --config RUN.toml --pairs 7
    python benchmarks/routing_gap.py --rows 32               # the same windows, 32 per batch
    python benchmarks/routing_gap.py --spans 0.1 0.5         # also the per-phase split at those ratios

Thresholds are calibrated on the run's validation batches as the run calibrates them, and the
timed batches are the run's (its first ``timing_batches`` test batches). Each wall ratio is the
median over ``--pairs`` of routed / full, both timed batch by batch back to back (the run uses 3
pairs), on the run's device and dtype (CUDA events on a GPU). ``--rows N`` regroups the same timed
windows into batches of N rows: the same tokens, thresholds and decisions, with each stage call's
fixed cost spread over more tokens.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from cascade_bench.cost.measurement import measure_cost
from cascade_bench.data.prepare import hold_out_validation
from cascade_bench.experiment.config import ExperimentConfig, load_config_file, make_config
from cascade_bench.experiment.pipeline import experiment_paths, prepared_data
from cascade_bench.measure.allocator import retain_freed_memory
from cascade_bench.measure.probes import NO_PROBE, Probe
from cascade_bench.measure.timing import SpanTimer, interleaved_ratio
from cascade_bench.routing.calibration import calibrate_sweep
from cascade_bench.routing.passes import forward_cascade
from cascade_bench.training.persistence import load_ensemble

PHASES = ("layers", "exit_head", "gather", "scatter")
METHODS = ("full", "routed")


def regrouped(batches: list[dict], rows: int) -> list[dict]:
    """The same windows in batches of ``rows`` (the last one may be smaller)."""
    keys = [key for key in ("input_ids", "attention_mask", "targets") if batches[0].get(key) is not None]
    joined = {key: torch.cat([batch[key] for batch in batches]) for key in keys}
    total = joined["input_ids"].shape[0]
    return [{key: value[start : start + rows] for key, value in joined.items()} for start in range(0, total, rows)]


def pass_kwargs(method: str, thresholds) -> dict:
    """How the run measures ``method``: routed early exit with bucketed batching at ``thresholds``."""
    return dict(batching="bucketed", thresholds=thresholds) if method == "routed" else {}


def passes(cascade, batches: list[dict], method: str, thresholds, probe: Probe = NO_PROBE) -> list:
    """One call per batch of ``method``'s pass."""
    extra = pass_kwargs(method, thresholds)
    return [
        lambda batch=batch: forward_cascade(
            cascade,
            batch["input_ids"],
            batch.get("attention_mask"),
            batch.get("targets"),
            method=method,
            probe=probe,
            **extra,
        )
        for batch in batches
    ]


def flop_counts(cascade, batches: list[dict], method: str, thresholds) -> dict[str, int]:
    """Analytic FLOPs of the pass over ``batches``: all of them, the exit heads' (2 x a head's
    multiply-adds per token whose logits it computed) and the layers' (the rest)."""
    extra = pass_kwargs(method, thresholds)
    cost = measure_cost(cascade, batches, method, timed=False, count_flops=False, fvcore=False, spans=False, **extra)
    heads = sum(2 * stage.head_macs_per_token * share.head_tokens for stage, share in zip(cascade.stages, cost.stages))
    return {"pass": cost.flops_analytic, "exit_head": heads, "layers": cost.flops_analytic - heads}


def print_price_split(split: dict, full_counts: dict, routed_counts: dict) -> None:
    """Where the routed pass's wall ratio leaves its FLOP ratio: each part of it priced at what the
    same part costs per FLOP in the full pass (the rest, which has no FLOPs, at the full pass's own
    rest per pass), and what it costs beyond that. Shares of the full pass's time and FLOPs."""
    full, routed = split["full"], split["routed"]
    full_flops = {part: count / full_counts["pass"] for part, count in full_counts.items()}
    routed_flops = {part: count / full_counts["pass"] for part, count in routed_counts.items()}
    rest = {m: split[m]["pass"] - split[m]["layers"] - split[m]["exit_head"] for m in METHODS}
    print("\nthe routed pass priced at the full pass's time per FLOP (shares of the full pass's time):")
    print("| part | FLOP share | at full-pass prices | measured | beyond |")
    print("| --- | --- | --- | --- | --- |")
    priced_total = measured_total = 0.0
    for part, label in (("layers", "layers"), ("exit_head", "exit heads")):
        priced = routed_flops[part] * (full[part] / full["pass"]) / full_flops[part]
        measured = routed[part] / full["pass"]
        priced_total, measured_total = priced_total + priced, measured_total + measured
        print(f"| {label} | {routed_flops[part]:.3f} | {priced:.3f} | {measured:.3f} | {measured - priced:+.3f} |")
    priced, measured = rest["full"] / full["pass"], rest["routed"] / full["pass"]
    priced_total, measured_total = priced_total + priced, measured_total + measured
    print(f"| gather, scatter, the rest | 0 | {priced:.3f} | {measured:.3f} | {measured - priced:+.3f} |")
    print(
        f"| whole pass | {routed_flops['pass']:.3f} | {priced_total:.3f} | {measured_total:.3f} "
        f"| {measured_total - priced_total:+.3f} |"
    )


def phase_split(cascade, batches: list[dict], thresholds, repeats: int) -> dict[str, dict[str, float]]:
    """Milliseconds per phase (summed over stages and batches; 'other' is the rest of the pass),
    median over ``repeats``, for the full and the routed pass, the two timed by turns (after one
    untimed turn) so that drift of a shared machine reaches both alike."""
    samples: dict[str, list[dict]] = {method: [] for method in METHODS}
    for _ in range(repeats + 1):
        for method in METHODS:
            timer = SpanTimer(cascade.device)
            with timer.span("pass"):
                for call in passes(cascade, batches, method, thresholds if method == "routed" else None, timer):
                    call()
            spans = timer.results()
            parts = {p: sum(v for k, v in spans.items() if k.endswith(f".{p}")) * 1e3 for p in PHASES}
            parts["other"] = spans["pass"] * 1e3 - sum(parts.values())
            parts["pass"] = spans["pass"] * 1e3
            samples[method].append(parts)
    return {
        method: {p: statistics.median(s[p] for s in taken[1:]) for p in (*PHASES, "other", "pass")}
        for method, taken in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="the run's TOML config (default: the default run)")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=0, help="regroup the timed windows N per batch (0: the run's)")
    parser.add_argument("--spans", type=float, nargs="*", default=[], help="hard ratios to split by phase")
    args = parser.parse_args()
    config = make_config(load_config_file(args.config)) if args.config else ExperimentConfig()
    paths = experiment_paths(config)
    folder = paths["models"] / "cascade"
    if not folder.exists():
        raise SystemExit(f"no saved cascade at {folder}: run `cascade-bench run` with this config first")
    retain_freed_memory()
    torch.set_num_threads(config.threads)
    data = prepared_data(config, paths, None, None)
    data, _ = hold_out_validation(data, config.risk_batches)
    validation = data.validation[: config.validation_batches] if config.validation_batches else data.validation
    scored = data.test if config.eval_split == "test" else data.validation
    timed = scored[: config.timing_batches] if config.timing_batches else scored
    if args.rows:
        timed = regrouped(timed, args.rows)
    cascade = load_ensemble(folder, device=config.device, dtype=getattr(torch, config.dtype)).eval()
    ratios = sorted(set(config.hard_ratios) | set(args.spans))
    shapes = sorted({tuple(batch["input_ids"].shape) for batch in timed})
    print(
        f"{folder}: {len(timed)} timed batches of shapes {shapes}, {args.pairs} pairs, "
        f"{config.device}/{config.dtype}, {config.threads} threads"
    )
    print("| hard ratio | FLOP ratio (timed batches) | wall ratio | wall - FLOP |")
    print("| --- | --- | --- | --- |")
    gaps = []
    with torch.inference_mode():
        thresholds = calibrate_sweep(cascade, validation, ratios)
        full_counts = flop_counts(cascade, timed, "full", None)
        routed_counts = {ratio: flop_counts(cascade, timed, "routed", thresholds[ratio]) for ratio in ratios}
        full_calls = passes(cascade, timed, "full", None)
        for ratio in config.hard_ratios:
            flop_ratio = routed_counts[ratio]["pass"] / full_counts["pass"]
            routed_calls = passes(cascade, timed, "routed", thresholds[ratio])
            wall = interleaved_ratio(routed_calls, full_calls, pairs=args.pairs, device=cascade.device)
            gaps.append(wall - flop_ratio)
            print(f"| {ratio:g} | {flop_ratio:.3f} | {wall:.3f} | {wall - flop_ratio:.3f} |", flush=True)
        print(f"| median | | | {statistics.median(gaps):.3f} |")
        for ratio in args.spans:
            split = phase_split(cascade, timed, thresholds[ratio], repeats=args.pairs)
            print(f"\nhard ratio {ratio:g}, milliseconds over the timed batches (median of {args.pairs}):")
            print("| pass | " + " | ".join((*PHASES, "other", "whole pass")) + " |")
            print("| --- " * (len(PHASES) + 3) + "|")
            for method, parts in split.items():
                row = " | ".join(f"{parts[p]:.1f}" for p in (*PHASES, "other", "pass"))
                print(f"| {method} | {row} |")
            print_price_split(split, full_counts, routed_counts[ratio])


if __name__ == "__main__":
    main()
