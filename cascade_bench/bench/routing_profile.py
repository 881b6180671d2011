"""Where a routed pass spends its time: per stage, the layers against everything around them.

``routing_profile`` times the full cascade and routed early exit (each batching mode) on one batch
with a ``SpanTimer`` in the pass: per stage the router's own spans (``measure.probes``) ``gather``
(laying out the tokens that reached the stage: masks, indices, compaction), ``layers`` (the stage's
model), ``exit_head`` (lm_head and NLL), ``exit_rule`` (the confidence), the rest of ``exit`` (the
decision and its bookkeeping), ``scatter`` (results back to original positions, continuing tokens
split off) and what the stage span holds beyond those; then the time outside every stage span
(setting up the pass, assembling the output). Milliseconds of the repeat whose pass time is the
median (one repeat, so the parts add up to the pass); the span timer's own calls are inside the
figures (tens of nanoseconds each). Each pass row also gives the minor page faults per pass (warm-up
and repeats averaged): memory the kernel mapped in again, which ``measure.allocator`` removes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..data.corpus import embedded_byte_windows
from ..data.markdown import markdown_table
from ..data.storage import write_json_atomic
from ..measure.environment import environment_conditions
from ..measure.timing import time_spans
from ..routing import compaction
from ..routing.passes import forward_cascade
from ..stages.ensemble import Ensemble, evaluation_mode
from .routing import BENCH_METHODS, forced_thresholds, stage0_confidence

#: The columns of the profile, in pass order; "exit other" and "stage other" are what the enclosing
#: span holds beyond its named parts.
PHASES = ("gather", "layers", "exit_head", "exit_rule", "exit other", "scatter", "stage other")


def _stage_row(method: str, hard_ratio: float, k: int, ms: dict) -> dict:
    """Stage ``k``'s row from one repeat's span milliseconds ``ms``: each phase, what the exit spent
    beyond its head and rule, what the stage spent beyond its phases, and the layers' share."""
    stage = ms.get(f"stage{k}", 0.0)
    part = {p: ms.get(f"stage{k}.{p}", 0.0) for p in ("gather", "layers", "exit_head", "exit_rule", "scatter")}
    part["exit other"] = ms.get(f"stage{k}.exit", 0.0) - part["exit_head"] - part["exit_rule"]
    part["stage other"] = stage - part["gather"] - part["layers"] - ms.get(f"stage{k}.exit", 0.0) - part["scatter"]
    return {
        "method": method,
        "hard ratio": hard_ratio,
        "stage": str(k),
        **part,
        "total": stage,
        "layers share": part["layers"] / stage if stage else math.nan,
    }


def routing_profile(
    ensemble: Ensemble,
    input_ids: torch.Tensor,
    hard_ratio: float = 0.5,
    methods: Sequence[str] = ("full", "routed-padded", "routed-bucketed"),
    warmup: int = 2,
    repeats: int = 7,
) -> list[dict]:
    """Rows: one per (method, stage) with each phase's milliseconds (median repeat), and one per method for
    the time outside the stages (``stage = "outside"``) and the whole pass (``stage = "pass"``)."""
    unknown = [m for m in methods if m not in BENCH_METHODS]
    if unknown:
        raise ValueError(f"methods must come from {list(BENCH_METHODS)}, got {list(methods)}")
    rows = []
    with evaluation_mode(ensemble), torch.inference_mode():
        thresholds = forced_thresholds(ensemble, stage0_confidence(ensemble, input_ids), hard_ratio)
        for method in methods:
            faults_before = minor_page_faults()
            wall, spans = time_spans(
                lambda p, kw=BENCH_METHODS[method]: forward_cascade(
                    ensemble, input_ids, thresholds=thresholds, probe=p, **kw
                ),
                input_ids.device,
                warmup,
                repeats,
            )
            faults = (minor_page_faults() - faults_before) / (warmup + repeats)
            # One repeat's spans (the repeat whose pass time is the median), so the parts add up to the pass.
            order = sorted(range(len(wall.samples)), key=wall.samples.__getitem__)
            pick = order[(len(order) - 1) // 2]
            ms = {name: stats.samples[pick] * 1e3 for name, stats in spans.items() if len(stats.samples) == len(order)}
            inside = 0.0
            for k in range(len(ensemble)):
                inside += ms.get(f"stage{k}", 0.0)
                rows.append(_stage_row(method, hard_ratio, k, ms))
            total = wall.samples[pick] * 1e3
            rows.append(
                {
                    "method": method,
                    "hard ratio": hard_ratio,
                    "stage": "outside",
                    **{p: math.nan for p in PHASES},
                    "total": total - inside,
                    "layers share": math.nan,
                }
            )
            layers = sum(r["layers"] for r in rows if r["method"] == method and r["stage"].isdigit())
            rows.append(
                {
                    "method": method,
                    "hard ratio": hard_ratio,
                    "stage": "pass",
                    **{p: math.nan for p in PHASES},
                    "total": total,
                    "layers share": layers / total,
                    "page faults": faults,
                }
            )
    return rows


def minor_page_faults() -> float:
    """Minor page faults of this process so far (memory the kernel had to map in), NaN where unknown."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return math.nan
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def format_profile(rows: Sequence[dict]) -> str:
    """Markdown: milliseconds per phase (n/a where a phase does not apply)."""
    header = ["method", "stage", *PHASES, "total", "layers share", "page faults per pass"]
    table = []
    for row in rows:
        cells = [row["method"], row["stage"]]
        cells += ["n/a" if math.isnan(row[p]) else f"{row[p]:.3f}" for p in PHASES]
        cells += [f"{row['total']:.3f}", "n/a" if math.isnan(row["layers share"]) else f"{row['layers share']:.2f}"]
        faults = row.get("page faults", math.nan)
        table.append([*cells, "" if math.isnan(faults) else f"{faults:,.0f}"])
    return markdown_table(header, table)


__all__ = ["PHASES", "format_profile", "profile_path", "routing_profile", "run_routing_profile"]


def run_routing_profile(
    ensemble: Ensemble,
    origin: str,
    *,
    batch_size: int = 8,
    seq_len: int = 512,
    hard_ratios: Sequence[float] = (0.75, 0.5, 0.25),
    warmup: int = 2,
    repeats: int = 7,
    json_path: Optional[Path] = None,
) -> tuple[list[dict], dict]:
    """``bench-routing --profile`` on the embedded text: (rows at every hard ratio, conditions),
    written to ``json_path`` (the bench's JSON name with ``.profile.json``)."""
    input_ids = embedded_byte_windows(batch_size, seq_len).to(ensemble.device)
    rows = [
        row
        for ratio in hard_ratios
        for row in routing_profile(ensemble, input_ids, ratio, warmup=warmup, repeats=repeats)
    ]
    conditions = {
        **environment_conditions(ensemble.device, ensemble.dtype),
        "model": str(origin),
        "layers_per_stage": list(ensemble.layers_per_stage),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "exit_rule": ensemble[0].exit_rule.name,
        "warmup": warmup,
        "repeats": repeats,
        "call_overhead_slots": compaction.CALL_OVERHEAD_SLOTS,
    }
    if json_path is not None:
        write_json_atomic(profile_path(json_path), {"conditions": conditions, "rows": rows})
    return rows, conditions


def profile_path(json_path: Path) -> Path:
    """Where the profile of a bench whose JSON goes to ``json_path`` is written."""
    return Path(json_path).with_name(Path(json_path).stem + ".profile.json")
