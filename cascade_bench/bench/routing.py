"""Routing benchmark: full cascade vs routed early exit (each batching mode) vs masked early exit.

All methods run on one batch in one process, with exit ratios after stage 0 forced by
calibrating stage 0's threshold on that batch. Timed repeats are interleaved across methods
so that machine noise hits them alike; FLOPs and peak memory are measured in separate,
untimed passes. Every ratio in the table comes from this one run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..data.corpus import byte_token_windows, embedded_documents
from ..data.storage import write_json_atomic
from ..measure.environment import environment_conditions
from ..measure.flops import count_flops
from ..measure.memory import peak_memory_bytes
from ..measure.timing import TimingStats, wall_time_once
from ..routing.calibration import threshold_for_hard_ratio
from ..routing.passes import forward_cascade
from ..stages.ensemble import Ensemble, evaluation_mode

#: name -> forward_cascade keyword arguments
BENCH_METHODS: dict[str, dict] = {
    "full": dict(method="full"),
    "routed-padded": dict(method="routed", batching="padded"),
    "routed-bucketed": dict(method="routed", batching="bucketed"),
    "masked": dict(method="masked"),
}


@dataclass(frozen=True)
class BenchRow:
    """One method at one forced exit ratio. Ratios are against ``full`` at the same exit ratio."""

    target_exit_ratio: float
    method: str
    exit_ratio: float
    median_s: float
    iqr_s: float
    tokens_per_s: float
    flops: int
    peak_bytes: int
    layer_cost: float
    padding_waste: float
    wall_ratio: float
    flop_ratio: float
    memory_ratio: float

    @property
    def wall_over_flop(self) -> float:
        return self.wall_ratio / self.flop_ratio


def bench_routing(ensemble: Ensemble, input_ids: torch.Tensor, exit_ratios: Sequence[float] = (0.25, 0.5, 0.75),
                  methods: Sequence[str] = tuple(BENCH_METHODS), warmup: int = 2, repeats: int = 7,
                  progress: bool = True) -> list[BenchRow]:
    """Measure every method at every forced exit ratio after stage 0 (see module docstring)."""
    unknown = [m for m in methods if m not in BENCH_METHODS]
    if unknown or "full" not in methods:
        raise ValueError(f"methods must include 'full' and come from {list(BENCH_METHODS)}, got {list(methods)}")
    num_tokens = input_ids.numel()
    rows: list[BenchRow] = []
    with evaluation_mode(ensemble), torch.inference_mode():
        probe = forward_cascade(ensemble, input_ids, method="routed", num_stages=1, confidence_at_last_stage=True)
        confidence = probe.stage_confidence[0].reshape(-1)
        later = [math.inf] * (len(ensemble) - 2)  # stages after 1 keep everyone (2-stage presets have none)
        for ratio in exit_ratios:
            thresholds = [threshold_for_hard_ratio(confidence, 1.0 - ratio), *later]
            calls = {m: (lambda kw=BENCH_METHODS[m]: forward_cascade(ensemble, input_ids, thresholds=thresholds, **kw))
                     for m in methods}
            for _ in range(warmup):
                for call in calls.values():
                    call()
            samples: dict[str, list[float]] = {m: [] for m in methods}
            for _ in range(repeats):
                for m, call in calls.items():
                    samples[m].append(wall_time_once(call, input_ids.device))
            measured = {}
            for m, call in calls.items():
                flops, out = count_flops(call)
                peak, _, _ = peak_memory_bytes(call, input_ids.device)
                measured[m] = (TimingStats(tuple(samples[m])), flops.flops, peak, out)
            full_time, full_flops, full_peak, _ = measured["full"]
            for m, (stats, flops, peak, out) in measured.items():
                rows.append(BenchRow(
                    target_exit_ratio=ratio, method=m, exit_ratio=out.exit_ratios[0], median_s=stats.median,
                    iqr_s=stats.iqr, tokens_per_s=num_tokens / stats.median, flops=flops, peak_bytes=peak,
                    layer_cost=out.layer_cost, padding_waste=max(out.padding_waste),
                    wall_ratio=stats.median / full_time.median, flop_ratio=flops / full_flops,
                    memory_ratio=peak / full_peak))
            if progress:
                print(f"  exit ratio {ratio:.2f}: done", flush=True)
    return rows


def check_bars(rows: Sequence[BenchRow], wall_over_flop_max: float = 1.08) -> list[tuple[str, bool]]:
    """The core issue's performance bars, as (description, met) pairs."""
    checks = []
    by_ratio: dict[float, dict[str, BenchRow]] = {}
    for row in rows:
        by_ratio.setdefault(row.target_exit_ratio, {})[row.method] = row
    for ratio, group in sorted(by_ratio.items()):
        for name, row in group.items():
            if not name.startswith("routed"):
                continue
            checks.append((f"exit {ratio:.0%} {name}: wall ratio {row.wall_ratio:.3f} <= "
                           f"{wall_over_flop_max} x FLOP ratio {row.flop_ratio:.3f} "
                           f"(= {wall_over_flop_max * row.flop_ratio:.3f})",
                           row.wall_ratio <= wall_over_flop_max * row.flop_ratio))
            if "masked" in group:
                checks.append((f"exit {ratio:.0%} {name}: {row.median_s * 1e3:.1f} ms not slower than masked "
                               f"{group['masked'].median_s * 1e3:.1f} ms", row.median_s <= group["masked"].median_s))
            checks.append((f"exit {ratio:.0%} {name}: peak memory {row.peak_bytes / 2**20:.1f} MiB <= full "
                           f"{group['full'].peak_bytes / 2**20:.1f} MiB", row.peak_bytes <= group["full"].peak_bytes))
    return checks


def format_table(rows: Sequence[BenchRow]) -> str:
    """A Markdown table of the rows."""
    header = ("| forced exit | method | exit at stage 0 | median ms | IQR ms | tokens/s | wall ratio | FLOP ratio | "
              "wall/FLOP | layer cost | padding | peak MiB | memory ratio |")
    lines = [header, "|" + "|".join([" --- "] * 13) + "|"]
    for r in rows:
        lines.append(f"| {r.target_exit_ratio:.0%} | {r.method} | {r.exit_ratio:.1%} | {r.median_s * 1e3:.1f} | "
                     f"{r.iqr_s * 1e3:.1f} | "
                     f"{r.tokens_per_s:,.0f} | {r.wall_ratio:.3f} | {r.flop_ratio:.3f} | {r.wall_over_flop:.3f} | "
                     f"{r.layer_cost:.3f} | {r.padding_waste:.1%} | {r.peak_bytes / 2**20:.1f} | {r.memory_ratio:.3f} |")
    return "\n".join(lines)


def run_routing_bench(ensemble: Ensemble, model: str, batch_size: int = 8, seq_len: int = 512,
                      exit_ratios: Sequence[float] = (0.25, 0.5, 0.75), warmup: int = 2, repeats: int = 7,
                      seed: int = 0, json_path: "Path | None" = None) -> tuple[list[BenchRow], list[tuple[str, bool]], dict]:
    """Run :func:`bench_routing` on the embedded real text and check the bars; ``model`` describes
    where the cascade came from, for the conditions."""
    text = "\n\n".join(text for _, text in embedded_documents())
    input_ids = byte_token_windows(text, batch_size, seq_len).to(ensemble.device)
    rows = bench_routing(ensemble, input_ids, exit_ratios, warmup=warmup, repeats=repeats)
    checks = check_bars(rows, wall_over_flop_max=1.08 if ensemble.device.type == "cpu" else 1.10)
    conditions = {
        **environment_conditions(ensemble.device, ensemble.dtype),
        "model": model, "layers_per_stage": list(ensemble.layers_per_stage), "batch_size": batch_size,
        "seq_len": seq_len, "exit_fn": ensemble[0].exit_function.name, "warmup": warmup, "repeats": repeats,
        "seed": seed, "data": "CPython pydoc_data topics, UTF-8 bytes as token ids (byte-level stand-in tokenizer)",
        "memory_measure": "peak_live_tensor_bytes" if ensemble.device.type == "cpu" else "cuda_max_allocated",
        "attention_flops": "full (non-causal) QK^T and PV, torch's SDPA formula",
    }
    if json_path is not None:
        write_json_atomic(Path(json_path), {"conditions": conditions, "rows": [asdict(r) for r in rows],
                                            "checks": [{"check": c, "met": ok} for c, ok in checks]})
    return rows, checks, conditions
